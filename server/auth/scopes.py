"""Scope names and how a route declares the scope it needs.

A route declares its scope beside its path, in Litestar's ``opt``:
``@get("/cases/{case_id:str}", opt=route_scope(CASES_READ))``.  The auth middleware reads it
from the matched handler; a handler that declares nothing is refused (fail closed), so adding a
route without deciding who may call it cannot open a hole.
"""

from __future__ import annotations

from typing import Any

CHAT = "chat"
EMBEDDINGS = "embeddings"
CASES_READ = "cases:read"
CASES_WRITE = "cases:write"
ADMIN = "admin"
METRICS = "metrics"

SCOPES: tuple[str, ...] = (CHAT, EMBEDDINGS, CASES_READ, CASES_WRITE, ADMIN, METRICS)
"""Every scope a key can hold.  ``admin`` does not imply the others (least privilege)."""

PUBLIC = "public"
"""Pseudo-scope: no key needed (liveness and readiness probes only)."""
AUTHENTICATED = "authenticated"
"""Pseudo-scope: any valid key, whatever its scopes (e.g. the OpenAPI document)."""

OPT_KEY = "scope"


def route_scope(*any_of: str) -> dict[str, Any]:
    """The ``opt`` for a route callable with any one of ``any_of``."""
    for name in any_of:
        if name not in (*SCOPES, PUBLIC, AUTHENTICATED):
            raise ValueError(f"unknown scope {name!r}; known: {', '.join(SCOPES)}")
    return {OPT_KEY: tuple(any_of)}


def required_scopes(handler: Any) -> tuple[str, ...] | None:
    """What the handler declared, or None when it declared nothing (the caller fails closed)."""
    declared = getattr(handler, "opt", {}).get(OPT_KEY) if handler is not None else None
    if declared is None:
        return None
    return (declared,) if isinstance(declared, str) else tuple(declared)


def parse_scopes(text: str) -> tuple[str, ...]:
    """``"chat,cases:read"`` -> ("chat", "cases:read"), rejecting unknown names."""
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in SCOPES]
    if unknown or not names:
        raise ValueError(
            f"unknown scope {', '.join(unknown) or '(none)'}; choose from {', '.join(SCOPES)}"
        )
    return names
