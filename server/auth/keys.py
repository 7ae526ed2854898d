"""One API key: its record in the key file, the token format, and how a token is checked.

A token reads ``msk_<key id>_<secret>``.  The key id lets the server find the one record to
check (no scan over every key) and lets people name a key in logs and commands without the
secret; ``prefix`` (id plus the secret's first characters) tells an old token from a rotated one.

Only a salted hash of the secret is stored: HMAC-SHA256 keyed with a per-key random salt.  A
slow password KDF (scrypt, argon2) exists to make guessing *low-entropy* passwords expensive;
these secrets are 256 random bits, so guessing is already infeasible, and a slow KDF would add
tens of milliseconds of CPU to every request on a 2-core box.  The salt still makes every
record's hash unique, so two stores never share a hash and precomputed tables are useless.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass

import msgspec

TOKEN_PREFIX = "msk"


class KeyRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    name: str
    """The integration holding the key (e.g. "emr-ward-7"): shown in logs and the audit trail."""
    prefix: str
    salt: str
    hash: str
    scopes: list[str]
    networks: list[str] = []
    """CIDRs the key may be used from; empty: any client address."""
    expires_at: float | None = None
    """Unix time after which the key is refused (403); None: never."""
    created_at: float = 0.0
    rotated_at: float | None = None
    revoked_at: float | None = None
    rpm: int | None = None
    """Requests per minute; None: the [auth] default; 0: unlimited."""
    tpm: int | None = None
    """Prompt plus completion tokens per minute; None: the [auth] default; 0: unlimited."""
    max_streams: int | None = None
    """Concurrent generation requests; None: the [auth] default; 0: unlimited."""

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= time.time():
            return "expired"
        return "active"


@dataclass(frozen=True)
class Issued:
    """A new or rotated key: the record to store and the token to show exactly once."""

    record: KeyRecord
    token: str


def new_key(
    name: str,
    scopes: tuple[str, ...],
    *,
    networks: tuple[str, ...] = (),
    expires_at: float | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    max_streams: int | None = None,
    existing_ids: set[str] | frozenset[str] = frozenset(),
) -> Issued:
    for cidr in networks:
        ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad network
    key_id = secrets.token_hex(4)
    while key_id in existing_ids:
        key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = KeyRecord(
        id=key_id,
        name=name,
        prefix=_prefix(key_id, secret),
        salt=salt.hex(),
        hash=_digest(salt, secret),
        scopes=list(scopes),
        networks=[str(ipaddress.ip_network(c, strict=False)) for c in networks],
        expires_at=expires_at,
        created_at=time.time(),
        rpm=rpm,
        tpm=tpm,
        max_streams=max_streams,
    )
    return Issued(record, _token(key_id, secret))


def rotated(record: KeyRecord) -> Issued:
    """Same id, name, scopes and limits with a new secret; the old token stops working."""
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    new = msgspec.structs.replace(
        record,
        prefix=_prefix(record.id, secret),
        salt=salt.hex(),
        hash=_digest(salt, secret),
        rotated_at=time.time(),
    )
    return Issued(new, _token(record.id, secret))


def split_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed token, else None."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def secret_matches(record: KeyRecord, secret: str) -> bool:
    return hmac.compare_digest(_digest(bytes.fromhex(record.salt), secret), record.hash)


def _digest(salt: bytes, secret: str) -> str:
    return hmac.new(salt, secret.encode(), hashlib.sha256).hexdigest()


def _token(key_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}_{key_id}_{secret}"


def _prefix(key_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}_{key_id}_{secret[:4]}"
