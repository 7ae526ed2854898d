"""An OpenAI-compatible server as a benchmark target (medserve, llama.cpp's llama-server, vLLM...).

Every request is ``POST /v1/chat/completions`` with ``stream: true`` and
``stream_options.include_usage``, so the server's own completion-token count arrives in the
last event when it supports that option; otherwise the core counts content deltas.  Chunks
are decoded into tiny msgspec structs that keep only the fields the benchmark reads.

Two HTTP clients, chosen per target with ``--http-client``:

- ``lean`` (default): ``sse_client.SSEClient``, blocking sockets, one thread per stream in
  flight, a timestamp per ``recv``.
- ``httpx``: ``httpx.AsyncClient.stream`` + ``aiter_lines`` on the event loop, the reference
  the lean client is checked against (same token counts) and compared with (client CPU per
  token in the JSON report).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import msgspec
from medserve.benchmarks.sse_client import (
    HTTPStatusError,
    ProtocolError,
    SSEClient,
    StreamHandle,
)
from medserve.benchmarks.target import Completion, TargetError
from medserve.benchmarks.workloads import WorkloadRequest

HTTPClientName = Literal["lean", "httpx"]
HTTP_CLIENTS: tuple[HTTPClientName, ...] = ("lean", "httpx")
CHAT_PATH = "/v1/chat/completions"
# Threads are started on demand, one per stream in flight; this only caps a runaway plan.
_MAX_STREAM_THREADS = 512


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None  # llama-server / vLLM reasoning models


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode = msgspec.json.Encoder().encode
_TRANSPORT_ERRORS = (OSError, EOFError, ProtocolError, httpx.HTTPError, msgspec.DecodeError)


class _Accumulator:
    """Folds decoded SSE payloads into a Completion; shared by both clients."""

    __slots__ = ("completion",)

    def __init__(self) -> None:
        self.completion = Completion()

    def add(self, payload: bytes, arrived: float) -> None:
        if payload == b"[DONE]":
            return
        chunk = _decode_chunk(payload)
        if chunk.error is not None:
            raise TargetError(f"error event: {_error_message(chunk.error)}")
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta is not None and (delta.content or delta.reasoning_content):
                self.completion.token_times.append(arrived)
        if chunk.usage is not None:
            self.completion.prompt_tokens = chunk.usage.prompt_tokens
            self.completion.completion_tokens = chunk.usage.completion_tokens


class OpenAIChatTarget:
    """Streams chat completions from one server; see ``medserve.benchmarks.target.Target``."""

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        http_client: HTTPClientName = "lean",
        timeout_s: float = 600.0,
    ) -> None:
        if http_client not in HTTP_CLIENTS:
            raise ValueError(f"unknown HTTP client {http_client!r}")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.http_client = http_client
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._lean: SSEClient | None = None
        self._httpx: httpx.AsyncClient | None = None
        self._threads: ThreadPoolExecutor | None = None
        if http_client == "lean":
            self._lean = SSEClient(self.base_url, headers, timeout_s)
            self._threads = ThreadPoolExecutor(_MAX_STREAM_THREADS, thread_name_prefix="bench")
        else:
            self._httpx = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, timeout=timeout_s, trust_env=False
            )

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "http",
            "url": self.base_url,
            "model": self.model,
            "http_client": self.http_client,
        }

    def _body(self, request: WorkloadRequest) -> bytes:
        return _encode(
            {
                "model": self.model,
                "messages": request.openai_messages(),
                "temperature": request.temperature,
                "max_tokens": request.max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )

    async def generate(self, request: WorkloadRequest) -> Completion:
        body = self._body(request)
        try:
            if self._lean is not None:
                handle = StreamHandle()
                loop = asyncio.get_running_loop()
                stream = loop.run_in_executor(self._threads, _lean_stream, self._lean, body, handle)
                try:
                    return await stream
                except asyncio.CancelledError:
                    handle.abort()  # past the deadline: hang up so the server stops too
                    raise
            if self._httpx is not None:
                return await _httpx_stream(self._httpx, body)
            raise TargetError("target is closed")
        except HTTPStatusError as exc:
            raise TargetError(f"HTTP {exc.status}: {_error_message(exc.body)}") from None
        except _TRANSPORT_ERRORS as exc:
            raise TargetError(type(exc).__name__) from None

    async def aclose(self) -> None:
        if self._lean is not None:
            self._lean.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if self._httpx is not None:
            await self._httpx.aclose()


def _lean_stream(client: SSEClient, body: bytes, handle: StreamHandle) -> Completion:
    """Runs in a worker thread: blocking reads, one timestamp per recv."""
    accumulator = _Accumulator()
    for arrived, payloads in client.post_sse(CHAT_PATH, body, handle):
        for payload in payloads:
            accumulator.add(payload, arrived)
    return accumulator.completion


async def _httpx_stream(client: httpx.AsyncClient, body: bytes) -> Completion:
    accumulator = _Accumulator()
    perf_counter = time.perf_counter
    async with client.stream(
        "POST", CHAT_PATH, content=body, headers={"content-type": "application/json"}
    ) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", "replace")
            raise HTTPStatusError(response.status_code, text)
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                accumulator.add(line[5:].strip().encode(), perf_counter())
    return accumulator.completion


def _error_message(error: Any) -> str:
    """The ``message`` of an OpenAI-shaped error (body text or event), else the text itself."""
    if isinstance(error, str):
        try:
            error = msgspec.json.decode(error)
        except msgspec.DecodeError:
            return error[:200]
    if isinstance(error, dict):
        inner = error.get("error", error)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:200]
    return str(error)[:200]


def discover_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model a server lists at ``/v1/models`` (llama-server lists its one model)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(
        base_url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s, trust_env=False
    )
    response.raise_for_status()
    data = response.json().get("data") or []
    if not data:
        raise ValueError(f"{base_url}/v1/models lists no model")
    return str(data[0]["id"])
