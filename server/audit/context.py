"""What a route tells the audit trail: which action it performs (declared beside the route,
in ``opt``) and which cases it touched (at run time, from the handler)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

OPT_KEY = "audit"
STATE_KEY = "audit_case_ids"


def audited(action: str) -> dict[str, Any]:
    """The ``opt`` entry that makes every call of a route leave one audit record."""
    return {OPT_KEY: action}


def note_cases(request: Any, case_ids: Iterable[str]) -> None:
    """Adds the cases this request created, read, changed or returned to its audit record."""
    state = request.scope.setdefault("state", {})
    state.setdefault(STATE_KEY, []).extend(case_ids)
