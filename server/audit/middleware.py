"""ASGI middleware: one audit record per call of a route declaring ``opt={"audit": action}``.

The record is written when the response starts -- its status is known then -- and the start of
the response waits for it.  If the record cannot be made durable the client gets 503 instead
of the data (fail closed): patient data is never served without a trace.  A write (POST or
DELETE of cases) has by then already been applied; the client sees 503 and may retry, which is
safe because case writes are idempotent upserts and deletes.
"""

from __future__ import annotations

from typing import Any

import structlog
from medserve.server.audit.case_ids import CaseIdHasher
from medserve.server.audit.context import OPT_KEY, STATE_KEY
from medserve.server.audit.writer import AuditLog, AuditWriteError, utc_now
from medserve.server.auth.reply import send_error

log = structlog.get_logger("medserve.audit")


class AuditMiddleware:
    def __init__(self, app: Any, audit_log: AuditLog, hash_case_id: CaseIdHasher) -> None:
        self.app = app
        self.audit_log = audit_log
        self.hash_case_id = hash_case_id

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        handler = scope.get("route_handler")
        action = getattr(handler, "opt", {}).get(OPT_KEY) if handler is not None else None
        if scope["type"] != "http" or action is None:
            await self.app(scope, receive, send)
            return
        progress = {"started": False, "refused": False}

        async def send_after_audit(message: dict[str, Any]) -> None:
            if progress["refused"]:
                return  # the 503 went out instead of this response
            if message["type"] == "http.response.start":
                progress["started"] = True
                try:
                    await self.audit_log.append(self._record(scope, action, message["status"]))
                except AuditWriteError as exc:
                    progress["refused"] = True
                    log.error("audit.request_refused", action=action, error=str(exc))
                    await send_error(
                        send,
                        503,
                        "the audit trail cannot be written, so patient data is not served",
                        code="audit_unavailable",
                    )
                    return
            await send(message)

        try:
            await self.app(scope, receive, send_after_audit)
        finally:
            if not progress["started"]:
                # The client went away before any response: the attempt is still recorded.
                try:
                    await self.audit_log.append(self._record(scope, action, 499))
                except AuditWriteError as exc:
                    log.error("audit.write_failed", action=action, error=str(exc))

    def _record(self, scope: dict[str, Any], action: str, status: int) -> dict[str, Any]:
        state = scope.get("state") or {}
        principal = state.get("principal")
        case_ids = list(state.get(STATE_KEY, ()))
        path_case = (scope.get("path_params") or {}).get("case_id")
        if path_case is not None and path_case not in case_ids:
            case_ids.insert(0, path_case)
        client = scope.get("client") or ("", 0)
        return {
            "v": 1,
            "time": utc_now(),
            "request_id": state.get("request_id"),
            "key_id": principal.key_id if principal else None,
            "key_name": principal.name if principal else None,
            "client": client[0],
            "method": scope.get("method"),
            "route": str(scope.get("path_template") or ""),
            "action": action,
            "cases": [self.hash_case_id(c) for c in dict.fromkeys(case_ids)],
            "status": status,
        }
