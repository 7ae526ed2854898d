"""ASGI middleware: the caller's key must hold a scope the matched route declares.

It runs after routing (Litestar applies middleware per route), so it reads the scope from the
matched handler's ``opt``.  401: no key or a bad, revoked or unknown one.  403: the key lacks
the route's scope, has expired, or is used from a network it is not allowed from -- and for a
route that declares no scope at all, which is a server bug that must not become an open door.
"""

from __future__ import annotations

from typing import Any

import structlog
from medserve.server.auth.authenticator import Authenticator, Refusal
from medserve.server.auth.reply import send_error
from medserve.server.auth.scopes import AUTHENTICATED, PUBLIC, required_scopes

log = structlog.get_logger("medserve.auth")


class AuthMiddleware:
    def __init__(self, app: Any, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            # No route speaks WebSocket; one added later must not skip the key check.
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = required_scopes(scope.get("route_handler"))
        if needed is None:
            log.error("auth.route_without_scope", route=str(scope.get("path_template")))
            await send_error(
                send,
                403,
                "this route declares no scope, so no key may call it",
                code="route_without_scope",
            )
            return
        if PUBLIC in needed:
            await self.app(scope, receive, send)
            return
        authorization = b""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                authorization = value
                break
        client = scope.get("client") or ("", 0)
        result = self.authenticator.authenticate(authorization, client[0])
        if isinstance(result, Refusal):
            extra = ((b"www-authenticate", b"Bearer"),) if result.status == 401 else ()
            await send_error(send, result.status, result.message, code=result.code, headers=extra)
            return
        scope.setdefault("state", {})["principal"] = result
        if AUTHENTICATED not in needed and result.scopes.isdisjoint(needed):
            await send_error(
                send,
                403,
                f"API key {result.key_id} lacks the scope this route needs: {' or '.join(needed)}",
                code="insufficient_scope",
            )
            return
        await self.app(scope, receive, send)
