"""ASGI middleware: request id, API-key check, and one access/audit log line per request.

The log line carries who (key fingerprint, client IP, user agent), what (method, route, status),
how long and how many tokens -- never a body, a query string or a header value that could hold
patient content.  It is written when the response is complete, so streamed responses are
logged with their final token counts and full latency.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from typing import Any

import msgspec
import structlog
from medserve.server.errors import error_body

log = structlog.get_logger("medserve.access")

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_OPEN_PATHS = ("/health", "/ready")


def key_fingerprint(key: str) -> str:
    """Identifies which key was used without writing the key to the log."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class AccessLogMiddleware:
    def __init__(self, app: Any, api_keys: tuple[str, ...] = ()) -> None:
        self.app = app
        self.api_keys = tuple(k.encode() for k in api_keys)

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

        actor = self._authenticate(scope["path"], headers)
        try:
            if actor is None:
                await self._reject(send_with_id)
            else:
                state["actor"] = actor
                await self.app(scope, receive, send_with_id)
        finally:
            usage = state.get("usage", {})
            client = scope.get("client") or ("-", 0)
            log.info(
                "request",
                request_id=request_id,
                method=scope.get("method"),
                route=_route(scope),
                status=status_holder["status"],
                latency_ms=round((time.perf_counter() - started) * 1000, 1),
                actor=actor or "rejected",
                client_ip=client[0],
                user_agent=headers.get("user-agent", b"").decode("latin-1")[:120],
                **{k: v for k, v in usage.items() if k in _USAGE_KEYS},
            )

    def _authenticate(self, path: str, headers: dict[str, bytes]) -> str | None:
        """Returns the actor name, or None when a key is required and missing or wrong."""
        if not self.api_keys or not path.startswith("/v1/"):
            return "anonymous"
        auth = headers.get("authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        for key in self.api_keys:
            if hmac.compare_digest(token.strip(), key):
                return "key:" + key_fingerprint(key.decode())
        return None

    @staticmethod
    async def _reject(send: Any) -> None:
        body = msgspec.json.encode(
            error_body(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
            )
        )
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _route(scope: dict[str, Any]) -> str:
    """The matched route template (/v1/cases/{case_id}), never the raw path: path parameters
    such as case ids can identify a patient.  Requests refused before routing (401) have none."""
    template = scope.get("path_template")
    return str(template) if template else "<unmatched>"


_USAGE_KEYS = {"model", "prompt_tokens", "completion_tokens", "finish_reason", "error"}
