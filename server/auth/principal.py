"""Who is calling: the key (or the anonymous caller of an open install) behind a request."""

from __future__ import annotations

from dataclasses import dataclass

from medserve.server.auth.scopes import SCOPES


@dataclass(frozen=True)
class Limits:
    """Per-minute and concurrency ceilings; 0 means unlimited."""

    rpm: int = 0
    tpm: int = 0
    max_streams: int = 0


@dataclass(frozen=True)
class Principal:
    key_id: str
    """What logs and the audit trail name: the key id, never the token."""
    name: str
    scopes: frozenset[str]
    limits: Limits

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}"


def anonymous(limits: Limits) -> Principal:
    """The caller of an install without any key: every scope, the default limits."""
    return Principal("anonymous", "anonymous", frozenset(SCOPES), limits)
