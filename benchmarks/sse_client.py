"""A lean blocking HTTP/1.1 client for one job: POST JSON, stream back SSE ``data:`` payloads.

Why not httpx, and why blocking: the bench client shares the machine's 2 cores with the engine
and the server, so every CPU-microsecond it spends per token is taken from the engine being
measured.  Tokens arrive one at a time, so the cost per token is mostly the cost of one
wake-up.  Measured on the 2-core EPYC VM against a local SSE source with 10 ms between events
(notes in the module docstring of ``http_target.py``): a blocking ``recv`` in a thread costs
~55 us per event, an asyncio ``StreamReader`` 130-200 us (two loop iterations per event),
httpx's ``aiter_lines`` more again.  So each stream runs in its own thread (the caller's
executor), takes one timestamp per ``recv``, and decodes chunks and SSE events from bytes.

Scope, deliberately small: plain ``http://`` (loopback or intranet), HTTP/1.1 keep-alive with
a small connection pool, chunked or Content-Length or read-to-close bodies, SSE events whose
lines end in ``\\n`` or ``\\r\\n``.  No TLS, redirects, compression or proxies.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

_RECV_BYTES = 65536
_HEAD_LIMIT = 64 * 1024
_ERROR_BODY_LIMIT = 64 * 1024


class HTTPStatusError(Exception):
    """The server answered with a status other than 200."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


class ProtocolError(Exception):
    """The reply is not HTTP/1.x as this client understands it."""


class SSEParser:
    """Incremental SSE parser: feed bytes, get the complete events' ``data`` payloads."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            # A "\r" left at the end is completed by the next feed; lone-CR endings (allowed by
            # the SSE spec, sent by no OpenAI-compatible server we know) are not supported.
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        payloads = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                payloads.append(event[6:])  # the usual case: one data line per event
                continue
            lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                stripped = (line[1:] if line[:1] == b" " else line for line in lines)
                payloads.append(b"\n".join(stripped))
        return payloads


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder; ``done`` once the last chunk is read.

    A chunk split across reads stays buffered until complete (SSE chunks are small).  The
    terminating ``0\\r\\n`` (trailers) ``\\r\\n`` is consumed whole, so a keep-alive connection
    is left exactly at the start of the next response.
    """

    __slots__ = ("_buffer", "done")

    def __init__(self) -> None:
        self._buffer = b""
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        parts: list[bytes] = []
        position, size_total = 0, len(buffer)
        while not self.done:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                break
            try:
                size = int(buffer[position:line_end].split(b";", 1)[0], 16)
            except ValueError:
                raise ProtocolError("bad chunk size line") from None
            if size == 0:
                end = buffer.find(b"\r\n\r\n", line_end)
                if end < 0:
                    break  # the final CRLF (and any trailers) not here yet
                self.done = True
                position = end + 4
                break
            data_end = line_end + 2 + size
            if data_end + 2 > size_total:
                break
            parts.append(buffer[line_end + 2 : data_end])
            position = data_end + 2
        self._buffer = buffer[position:]
        return parts


class _Body:
    """Turns received bytes into body parts, for chunked, Content-Length or read-to-close."""

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self.status = int(rest.split(" ", 1)[0])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.remaining = int(length) if length is not None and not self.chunked else None
        self.keep_alive = (
            version == "HTTP/1.1"
            and headers.get("connection", "").lower() != "close"
            and (self.chunked or self.remaining is not None)
        )
        self._decoder = ChunkedDecoder() if self.chunked else None

    @property
    def done(self) -> bool:
        if self._decoder is not None:
            return self._decoder.done
        return self.remaining is not None and self.remaining <= 0

    def feed(self, data: bytes) -> list[bytes]:
        if self._decoder is not None:
            return self._decoder.feed(data)
        if self.remaining is not None:
            data = data[: self.remaining]
            self.remaining -= len(data)
        return [data] if data else []


class StreamHandle:
    """Lets another thread abort one ``post_sse`` call (a request past its deadline).

    Aborting shuts the socket down: the blocked ``recv`` returns at once and the server sees
    the client go away (medserve then stops generating and frees the request's KV cache).
    """

    __slots__ = ("_aborted", "_lock", "_sock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = False

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self._aborted:
                _shutdown(sock)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class SSEClient:
    """POSTs JSON to one ``http://host:port`` and yields SSE ``data`` payloads as they arrive.

    Thread-safe: each call uses its own connection (from a small keep-alive pool); a reused
    connection that the server closed while idle is retried once on a fresh one.  ``close()``
    also shuts down connections in use, so streams still running end at once.
    """

    def __init__(
        self, base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 600.0
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                f"the lean client speaks plain http:// only, not {base_url!r} "
                "(use --http-client httpx)"
            )
        self._address = (parts.hostname, parts.port or 80)
        self._prefix = parts.path.rstrip("/")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        extra = "".join(f"{key}: {value}\r\n" for key, value in (headers or {}).items())
        self._head = (
            "POST {path} HTTP/1.1\r\n"
            f"Host: {host_header}\r\n"
            "Content-Type: application/json\r\n"
            "Accept: text/event-stream\r\n"
            "User-Agent: medserve-bench\r\n"
            f"{extra}"
            "Content-Length: {length}\r\n\r\n"
        )
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self._busy: set[socket.socket] = set()
        self._closed = False

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self._address, timeout=self._timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Blocking mode for Python (one recv syscall per read, no poll first) with the
        # timeout enforced by the kernel instead: a silent server cannot hang a thread.
        sock.settimeout(None)
        seconds = int(self._timeout_s)
        micros = int((self._timeout_s - seconds) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))
        return sock

    def _checkout(self) -> tuple[socket.socket, bool]:
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("client closed")
            sock = self._idle.pop() if self._idle else None
        reused = sock is not None
        if sock is None:
            sock = self._connect()
        with self._lock:
            self._busy.add(sock)
        return sock, reused

    def _release(self, sock: socket.socket, keep: bool) -> None:
        with self._lock:
            self._busy.discard(sock)
            if keep and not self._closed:
                self._idle.append(sock)
                return
        sock.close()

    def _open(self, request: bytes) -> tuple[socket.socket, _Body, bytes]:
        """Send the request; return the socket, the parsed head and the first body bytes."""
        while True:
            sock, reused = self._checkout()
            try:
                sock.sendall(request)
                received = b""
                while (end := received.find(b"\r\n\r\n")) < 0:
                    data = sock.recv(_RECV_BYTES)
                    if not data:
                        raise ConnectionResetError("connection closed before the response")
                    received += data
                    if len(received) > _HEAD_LIMIT:
                        raise ProtocolError("response head too large")
                return sock, _Body(received[: end + 4]), received[end + 4 :]
            except ConnectionError:
                self._release(sock, keep=False)
                if not reused:
                    raise
                self._drop_idle()  # the server's idle timeout closed them all: start afresh
            except BaseException:
                self._release(sock, keep=False)
                raise

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def post_sse(
        self, path: str, body: bytes, handle: StreamHandle | None = None
    ) -> Iterator[tuple[float, list[bytes]]]:
        """Yield ``(arrival time, payloads)`` per read that completed events.

        Arrival times are ``time.perf_counter()`` right after ``recv`` returned.  Raises
        HTTPStatusError for a non-200 reply, OSError for connection trouble or an abort.
        """
        request = self._head.format(path=self._prefix + path, length=len(body)).encode() + body
        sock, response, data = self._open(request)
        if handle is not None:
            handle.attach(sock)
        complete = False
        perf_counter = time.perf_counter
        try:
            if response.status != 200:
                error = b"".join(response.feed(data))
                while not response.done and len(error) < _ERROR_BODY_LIMIT:
                    more = sock.recv(_RECV_BYTES)
                    if not more:
                        break
                    error += b"".join(response.feed(more))
                complete = response.done
                raise HTTPStatusError(response.status, error.decode("utf-8", "replace"))
            parser = SSEParser()
            arrived = perf_counter()
            while True:
                for part in response.feed(data):
                    payloads = parser.feed(part)
                    if payloads:
                        yield arrived, payloads
                if response.done:
                    complete = True
                    return
                data = sock.recv(_RECV_BYTES)
                arrived = perf_counter()
                if not data:
                    if response.chunked or response.remaining:
                        raise ConnectionResetError("connection closed mid-response")
                    return  # read-to-close body ended
        finally:
            # A body left unread (the consumer stopped early) makes the connection unusable.
            self._release(sock, keep=complete and response.keep_alive)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            busy = list(self._busy)
        self._drop_idle()
        for sock in busy:
            _shutdown(sock)  # wakes the thread blocked in recv
