"""Answer an ASGI request with an OpenAI-shaped error, from middleware that runs before any
route handler (so Litestar's exception handlers are not in the way yet)."""

from __future__ import annotations

from typing import Any

import msgspec
from medserve.server.errors import error_body


async def send_error(
    send: Any,
    status: int,
    message: str,
    *,
    code: str,
    param: str | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    body = msgspec.json.encode(error_body(status, message, param=param, code=code))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
