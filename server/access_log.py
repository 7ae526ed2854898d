"""ASGI middleware: request id and one access log line per request.

It is the outermost middleware, so refused requests (401, 403, 429) are logged too.  Who may
call what is decided by server/auth (the next middleware), which leaves the caller's Principal
in ``scope["state"]``; the patient-data audit trail is server/audit.

The log line carries who (key id, client IP, user agent), what (method, route, status),
how long and how many tokens -- never a body, a query string or a header value that could hold
patient content.  It is written when the response is complete, so streamed responses are
logged with their final token counts and full latency.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog

log = structlog.get_logger("medserve.access")

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class AccessLogMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        supplied = headers.get("x-request-id", b"").decode("latin-1")
        request_id = supplied if _SAFE_REQUEST_ID.match(supplied) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status_holder = {"status": 500}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            usage = state.get("usage", {})
            principal = state.get("principal")
            client = scope.get("client") or ("-", 0)
            log.info(
                "request",
                request_id=request_id,
                method=scope.get("method"),
                route=_route(scope),
                status=status_holder["status"],
                latency_ms=round((time.perf_counter() - started) * 1000, 1),
                actor=principal.actor if principal else "-",
                client_ip=client[0],
                user_agent=client_software(headers.get("user-agent", b"")),
                **{k: v for k, v in usage.items() if k in _USAGE_KEYS},
            )


_PRODUCT_TOKEN = re.compile(rb"[A-Za-z0-9._-]{1,40}(?:/[A-Za-z0-9._+-]{1,24})?")


def client_software(user_agent: bytes) -> str:
    """The first product token of User-Agent (``EMR-Connector/3.2``, ``OpenAI/Python 1.x``'s
    ``OpenAI``), never the rest: comments and later tokens are free text an integration may
    fill with anything, patient details included."""
    match = _PRODUCT_TOKEN.match(user_agent)
    return match.group().decode("ascii") if match else "-"


def _route(scope: dict[str, Any]) -> str:
    """The matched route template (/v1/cases/{case_id}), never the raw path: path parameters
    such as case ids can identify a patient.  Paths that match no route (404) have none."""
    template = scope.get("path_template")
    return str(template) if template else "<unmatched>"


_USAGE_KEYS = {"model", "prompt_tokens", "completion_tokens", "finish_reason", "error"}
