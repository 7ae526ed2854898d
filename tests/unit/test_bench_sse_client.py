"""The lean bench HTTP client: chunked decoding, SSE parsing, keep-alive, errors.

The normal path is tested against the real medserve server in
tests/integration/test_bench_cli.py; here a scripted loopback peer produces what a real server
does only by chance (a chunk split mid-way, an idle connection closed, a body without chunks).
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterator

import pytest
from medserve.benchmarks.sse_client import (
    ChunkedDecoder,
    HTTPStatusError,
    ProtocolError,
    SSEClient,
    SSEParser,
)

EVENTS = [b'{"n": 1}', b'{"n": 2}', b"[DONE]"]
SSE_BODY = b"".join(b"data: " + e + b"\n\n" for e in EVENTS)


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def test_sse_parser_handles_events_split_anywhere() -> None:
    for cut in range(1, len(SSE_BODY)):
        parser = SSEParser()
        assert parser.feed(SSE_BODY[:cut]) + parser.feed(SSE_BODY[cut:]) == EVENTS


def test_sse_parser_handles_crlf_comments_and_multiline_data() -> None:
    parser = SSEParser()
    text = b": keep-alive\r\n\r\nevent: x\r\ndata: a\r\ndata:b\r\n\r\ndata: c\r"
    assert parser.feed(text) == [b"a\nb"]
    assert parser.feed(b"\n\r\n") == [b"c"]  # the CRLF completed across two feeds


def test_chunked_decoder_handles_a_body_split_at_every_byte() -> None:
    body = _chunked(b"data: 1\n\n", b"data: 22\n\n", b"x" * 300)
    for cut in range(1, len(body)):
        decoder = ChunkedDecoder()
        parts = decoder.feed(body[:cut])
        assert not decoder.done or cut >= len(body) - 2
        parts += decoder.feed(body[cut:])
        assert parts == [b"data: 1\n\n", b"data: 22\n\n", b"x" * 300]
        assert decoder.done


def test_chunked_decoder_waits_for_the_final_crlf_and_rejects_garbage() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3;ext=1\r\nabc\r\n0\r\n") == [b"abc"]
    assert not decoder.done  # "0\r\n" alone: the closing CRLF is still to come
    decoder.feed(b"\r\n")
    assert decoder.done
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(b"zz\r\n")


Script = Callable[[socket.socket, int], None]
CONNECTIONS: dict[str, int] = {}  # peer url -> connections accepted


class _Peer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _read_request(conn: socket.socket) -> bool:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return False
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return True


@pytest.fixture
def peer() -> Iterator[Callable[[Script], str]]:
    """Start a loopback peer that answers each request with ``script(conn, request_number)``."""
    servers: list[_Peer] = []

    def start(script: Script) -> str:
        requests = 0
        url = ""

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                nonlocal requests
                CONNECTIONS[url] += 1
                while _read_request(self.request):
                    requests += 1
                    script(self.request, requests)

        server = _Peer(("127.0.0.1", 0), Handler)
        servers.append(server)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        CONNECTIONS[url] = 0
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _payloads(client: SSEClient) -> list[bytes]:
    return [p for _, payloads in client.post_sse("/v1/chat/completions", b"{}") for p in payloads]


OK_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def test_client_reuses_a_keep_alive_connection(peer: Callable[[Script], str]) -> None:
    one_chunk_per_event = _chunked(*(b"data: " + e + b"\n\n" for e in EVENTS))
    url = peer(lambda conn, n: conn.sendall(OK_HEAD + one_chunk_per_event))
    client = SSEClient(url)
    assert _payloads(client) == EVENTS
    assert _payloads(client) == EVENTS
    assert CONNECTIONS[url] == 1
    client.close()


def test_client_retries_when_the_server_closed_an_idle_connection(
    peer: Callable[[Script], str],
) -> None:
    def answer_then_close(conn: socket.socket, n: int) -> None:
        conn.sendall(OK_HEAD + _chunked(SSE_BODY))
        conn.shutdown(socket.SHUT_RDWR)  # as an idle timeout would, right after the reply

    client = SSEClient(peer(answer_then_close))
    assert _payloads(client) == EVENTS
    assert _payloads(client) == EVENTS  # the stale pooled connection is replaced, not fatal
    client.close()


def test_client_reads_content_length_and_read_to_close_bodies(
    peer: Callable[[Script], str],
) -> None:
    def plain(conn: socket.socket, n: int) -> None:
        if n == 1:
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(SSE_BODY), SSE_BODY)
            )
        else:
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + SSE_BODY)
            conn.shutdown(socket.SHUT_RDWR)

    client = SSEClient(peer(plain))
    assert _payloads(client) == EVENTS
    assert _payloads(client) == EVENTS
    client.close()


def test_client_raises_the_status_and_error_body(peer: Callable[[Script], str]) -> None:
    error = (
        b'{"error": {"message": "queue full", "type": "x", "param": null, "code": "overloaded"}}'
    )
    url = peer(
        lambda conn, n: conn.sendall(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n\r\n%s"
            % (len(error), error)
        )
    )
    client = SSEClient(url)
    with pytest.raises(HTTPStatusError) as caught:
        _payloads(client)
    assert caught.value.status == 503 and "queue full" in caught.value.body
    client.close()


def test_client_refuses_what_it_does_not_speak() -> None:
    with pytest.raises(ValueError, match="httpx"):
        SSEClient("https://127.0.0.1:8443")
