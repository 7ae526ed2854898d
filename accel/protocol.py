"""The messages between the server and an engine worker process, and how they are framed.

Every engine worker (OpenVINO, ipex-llm, IPEX, chatglm.cpp, llama.cpp), whatever virtual
environment it runs in, speaks exactly these messages, so supervision, admission, cancel and
streaming are written once (accel/worker_client.py on the server side, accel/worker_host.py in
the worker). Messages are msgspec Structs tagged by type and sent as msgpack frames (4-byte
big-endian length, then the payload) over a Unix socket pair: cheap to encode, checked on
decode, and the same in every environment that has msgspec.

  server -> worker: Configure (first), Add, Abort, StatsQuery, Shutdown
  worker -> server: Ready | Fatal (answer to Configure), Outputs (one per engine step, every
                    request that produced text or finished), Failed, StatsReply

One Outputs message per engine step, not one per token per request, keeps the server's event
loop to one wake-up per step however many streams run.
"""

from __future__ import annotations

import select
import socket
import struct
from typing import Any, Literal

import msgspec

FinishReason = Literal["stop", "length", "abort"]
FailureKind = Literal["invalid_prompt", "backend"]


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k filtering."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the decoded text by the worker host (engine-neutral)."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks only: fixed output length)."""
    json_schema: str | None = None
    """A JSON Schema (as JSON text) the output must satisfy, enforced by the engine's
    constrained decoding; only engines whose ModelDescription says structured_output."""


class CalledTool(msgspec.Struct, frozen=True):
    """A function call an assistant turn made: the name and its arguments as JSON text."""

    name: str
    arguments: str


class Turn(msgspec.Struct, frozen=True):
    role: str
    content: str
    tool_calls: tuple[CalledTool, ...] = ()
    """Calls of an assistant turn, for templates that write calls in their own syntax
    (ModelDescription.template_tools); other engines get the calls as ``content`` text."""


# -- server -> worker ---------------------------------------------------------------------


class Configure(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    model_name: str
    model_dir: str
    engine: str
    max_num_seqs: int
    max_context_tokens: int
    kv_cache_gb: float
    options: dict[str, Any] = {}
    """Engine-specific settings (threads, scheduler knobs, device...)."""


class Add(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    request_id: str
    sampling: Sampling
    prompt: str | None = None
    """Raw completion prompt, tokenized as is."""
    messages: tuple[Turn, ...] | None = None
    """Chat turns; the engine applies the model's chat template."""
    tools: tuple[dict[str, Any], ...] = ()
    """OpenAI function tools for the chat template to describe in its own syntax; sent only
    to engines whose ModelDescription says template_tools."""


class Abort(msgspec.Struct, frozen=True, tag=True):
    request_id: str


class StatsQuery(msgspec.Struct, frozen=True, tag=True):
    token: str


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    pass


# -- worker -> server ---------------------------------------------------------------------


class ModelDescription(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    architecture: str
    precision: str
    context_length: int
    engine: str
    pid: int
    structured_output: bool = False
    """The engine can constrain decoding to a JSON Schema (Sampling.json_schema)."""
    template_tools: bool = False
    """The model's chat template describes tools (Add.tools) and renders assistant calls
    (Turn.tool_calls) itself, in the syntax the model was trained on."""


class Ready(msgspec.Struct, frozen=True, tag=True):
    model: ModelDescription


class Fatal(msgspec.Struct, frozen=True, tag=True):
    message: str


class Delta(msgspec.Struct, frozen=True, array_like=True):
    """New text of one request after one step; the last one carries finish_reason."""

    request_id: str
    text: str
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_completion_tokens: int


class Outputs(msgspec.Struct, frozen=True, tag=True):
    deltas: list[Delta]


class Failed(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    kind: FailureKind
    message: str


class StatsReply(msgspec.Struct, frozen=True, tag=True):
    token: str
    stats: dict[str, Any]


ToWorker = Configure | Add | Abort | StatsQuery | Shutdown
FromWorker = Ready | Fatal | Outputs | Failed | StatsReply

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024


def encode_frame(message: msgspec.Struct) -> bytes:
    payload = msgspec.msgpack.encode(message)
    return _HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return length


HEADER_SIZE = _HEADER.size
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)


class BlockingChannel:
    """The worker's end of the socket: blocking sends, receives that wait at most a timeout.

    The socket stays in blocking mode (a send must wait when the server reads slowly, never
    fail); receives poll, then read with MSG_DONTWAIT.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sock.setblocking(True)
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._buffer = bytearray()
        self._closed = False

    def send(self, message: msgspec.Struct) -> None:
        self._sock.sendall(encode_frame(message))

    def receive(self, timeout_s: float) -> list[ToWorker]:
        """Every complete message waiting, after waiting up to ``timeout_s`` for the first.

        Raises EOFError once the server's end is closed (the server exited, even by kill -9)
        and every message it sent before has been returned.
        """
        if not self._closed and timeout_s > 0:
            self._poller.poll(timeout_s * 1000)
        while not self._closed:
            try:
                chunk = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                self._closed = True
                break
            self._buffer += chunk
        messages = self._split()
        if not messages and self._closed:
            raise EOFError("server closed the channel")
        return messages

    def _split(self) -> list[ToWorker]:
        messages: list[ToWorker] = []
        view = self._buffer
        offset = 0
        while len(view) - offset >= HEADER_SIZE:
            length = frame_length(bytes(view[offset : offset + HEADER_SIZE]))
            end = offset + HEADER_SIZE + length
            if len(view) < end:
                break
            messages.append(to_worker_decoder.decode(bytes(view[offset + HEADER_SIZE : end])))
            offset = end
        del self._buffer[:offset]
        return messages
