"""A deadline on reading request headers, which uvicorn does not have.

uvicorn's only per-connection timer is ``timeout_keep_alive``, armed *after* a response: a
client that connects and then trickles header bytes (slow loris), or sends nothing at all,
keeps its connection and file descriptor for ever.  One such client costs little, but a few
thousand exhaust the process's descriptors and every EMR integration is refused.  Here each
request must complete its headers within ``header_timeout_s`` of the connection opening (or
of its first byte on a kept-alive connection); otherwise the connection is closed.
Other clients are never blocked meanwhile: the event loop only sees a few bytes now and then.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a header-read deadline (pass as ``Config(http=...)``)."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                # A response is still going out on this connection (the slow headers are a
                # pipelined next request): let it finish, then the deadline applies again.
                self._arm_header_timer()
                return
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
