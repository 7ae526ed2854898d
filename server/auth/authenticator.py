"""Turns an ``Authorization`` header and a client address into a Principal or a refusal.

Open installs: while no key exists (no record in the key file and no ``server.api_keys``), every
caller is the anonymous principal, as before keys existed; the server warns about it at start.
The first key seen (at start or later, when `medserve keys create` writes the file) switches
authentication on for the life of the process, so deleting the key file later locks everyone
out instead of opening the server.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from medserve.server.auth.keys import KeyRecord, secret_matches, split_token
from medserve.server.auth.principal import Limits, Principal, anonymous
from medserve.server.auth.scopes import SCOPES
from medserve.server.auth.store import LiveKeys

log = structlog.get_logger("medserve.auth")


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    code: str


_NO_KEY = Refusal(
    401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "invalid_api_key"
)


def legacy_key_id(token: str) -> str:
    """Stable id of a ``server.api_keys`` entry for logs: a hash prefix, never the key."""
    return "cfg-" + hashlib.sha256(token.encode()).hexdigest()[:8]


class Authenticator:
    def __init__(
        self, keys_file: Path, legacy_keys: tuple[str, ...], default_limits: Limits
    ) -> None:
        self.keys = LiveKeys(keys_file)
        self.default_limits = default_limits
        self._legacy = {
            token.encode(): Principal(
                legacy_key_id(token), "server.api_keys", frozenset(SCOPES), default_limits
            )
            for token in legacy_keys
        }
        self._anonymous = anonymous(default_limits)
        self._enforcing = bool(self._legacy) or bool(self.keys.refresh()) or self.keys.damaged
        self._networks: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
        self._log_start(keys_file)

    @property
    def enforcing(self) -> bool:
        return self._enforcing

    def authenticate(self, authorization: bytes, client_ip: str) -> Principal | Refusal:
        records = self.keys.refresh()
        if not self._enforcing:
            if not records and not self.keys.damaged:
                return self._anonymous
            self._enforcing = True
            log.warning("auth.enabled", reason="a key was added to the key file")
        scheme, _, raw = authorization.partition(b" ")
        token = raw.strip()
        if scheme.lower() != b"bearer" or not token:
            return _NO_KEY
        for legacy_token, principal in self._legacy.items():
            if hmac.compare_digest(token, legacy_token):
                return principal
        parts = split_token(token.decode("latin-1"))
        record = records.get(parts[0]) if parts else None
        if parts is None or record is None or not secret_matches(record, parts[1]):
            return _NO_KEY
        if record.revoked_at is not None:
            return _NO_KEY
        if record.expires_at is not None and record.expires_at <= time.time():
            return Refusal(403, f"API key {record.id} has expired", "key_expired")
        if record.networks and not self._allowed(record, client_ip):
            return Refusal(
                403, f"API key {record.id} may not be used from this address", "network_not_allowed"
            )
        return self._principal(record)

    def _principal(self, record: KeyRecord) -> Principal:
        d = self.default_limits
        return Principal(
            key_id=record.id,
            name=record.name,
            scopes=frozenset(record.scopes),
            limits=Limits(
                rpm=d.rpm if record.rpm is None else record.rpm,
                tpm=d.tpm if record.tpm is None else record.tpm,
                max_streams=d.max_streams if record.max_streams is None else record.max_streams,
            ),
        )

    def _allowed(self, record: KeyRecord, client_ip: str) -> bool:
        cache_key = record.id + "|" + ",".join(record.networks)
        networks = self._networks.get(cache_key)
        if networks is None:
            networks = [ipaddress.ip_network(n, strict=False) for n in record.networks]
            self._networks[cache_key] = networks
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in networks)

    def _log_start(self, keys_file: Path) -> None:
        if self._legacy:
            log.warning(
                "auth.legacy_api_keys",
                keys=len(self._legacy),
                message="server.api_keys is deprecated: these keys hold every scope; replace "
                "them with `medserve keys create` and remove server.api_keys",
            )
        if not self._enforcing:
            log.warning(
                "auth.disabled",
                keys_file=str(keys_file),
                message="no API key exists: every caller has every scope; create one with "
                "`medserve keys create` before exposing the server beyond loopback",
            )
