"""The shared worker loop, driven over a real socket with a scripted engine core.

The engine here is a stand-in that "generates" the UTF-8 bytes of a fixed answer, one byte
per step, so multi-byte characters span steps like byte-level BPE tokens do. Real engines
run the same loop in tests/integration (engine_contract.py).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from medserve.accel.engine_core import EngineStats, InvalidPrompt, PromptInput, StepOutput
from medserve.accel.protocol import (
    HEADER_SIZE,
    Abort,
    Add,
    BlockingChannel,
    Failed,
    ModelDescription,
    Outputs,
    Sampling,
    Shutdown,
    StatsQuery,
    StatsReply,
    encode_frame,
    frame_length,
    from_worker_decoder,
)
from medserve.accel.worker_host import WorkerHost


@dataclass
class ScriptedEngine:
    answers: dict[str, bytes] = field(default_factory=dict)
    """Prompt -> the bytes to generate for it."""
    positions: dict[str, tuple[bytes, int, int]] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    steps: int = 0
    fail_when_running: int | None = None
    """Raise from step() once this many requests run at once."""

    def describe(self) -> ModelDescription:
        return ModelDescription(
            name="scripted",
            architecture="none",
            precision="fp32",
            context_length=64,
            engine="scripted",
            pid=0,
        )

    def add(self, request: PromptInput) -> int:
        prompt = request.prompt or ""
        if prompt not in self.answers:
            raise InvalidPrompt(f"no answer for {prompt!r}")
        self.positions[request.request_id] = (self.answers[prompt], 0, request.sampling.max_tokens)
        return len(prompt)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.positions.pop(request_id, None)

    def has_work(self) -> bool:
        return bool(self.positions)

    def step(self) -> list[StepOutput]:
        self.steps += 1
        if self.fail_when_running is not None and len(self.positions) >= self.fail_when_running:
            raise RuntimeError("kernel exploded")
        outputs = []
        for request_id, (answer, pos, limit) in list(self.positions.items()):
            token = [answer[pos]]
            pos += 1
            finish = "length" if pos >= limit else ("stop" if pos >= len(answer) else None)
            outputs.append(StepOutput(request_id, token, finish))
            if finish:
                del self.positions[request_id]
            else:
                self.positions[request_id] = (answer, pos, limit)
        return outputs

    def decode(self, token_ids: Sequence[int]) -> str:
        if 0xFF in token_ids:
            raise ValueError("undecodable token")
        return bytes(token_ids).decode("utf-8", errors="replace")

    def stats(self) -> EngineStats:
        return EngineStats(len(self.positions), 0.5 if self.positions else 0.0, 1024, 64)

    def close(self) -> None:
        pass


class Server:
    """The server's end of the socket, read synchronously."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)

    def send(self, *messages: object) -> None:
        """One write, so the worker reads the messages together (as it would under load)."""
        self.sock.sendall(b"".join(encode_frame(m) for m in messages))  # type: ignore[arg-type]

    def receive(self) -> object:
        header = self._exactly(HEADER_SIZE)
        return from_worker_decoder.decode(self._exactly(frame_length(header)))

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "worker closed the channel"
            data += chunk
        return data

    def collect(self, request_ids: set[str]) -> dict[str, tuple[str, str | None]]:
        """Text and finish reason per request, until every one finished or failed."""
        text: dict[str, str] = {}
        done: dict[str, tuple[str, str | None]] = {}
        while len(done) < len(request_ids):
            message = self.receive()
            if isinstance(message, Failed) and message.request_id in request_ids:
                done[message.request_id] = (message.kind, message.message)
                continue
            assert isinstance(message, Outputs)
            for delta in message.deltas:
                assert "\ufffd" not in delta.text
                text[delta.request_id] = text.get(delta.request_id, "") + delta.text
                if delta.finish_reason and delta.request_id in request_ids:
                    done[delta.request_id] = (text[delta.request_id], delta.finish_reason)
        return done


@pytest.fixture
def running() -> Iterator[tuple[Server, ScriptedEngine]]:
    engine = ScriptedEngine(
        answers={
            "a": "肺炎 pneumonia 🙂 END tail".encode(),
            "b": b"short",
            "bad": b"ok\xff",
            "long": b"x" * 100_000,
        }
    )
    server_sock, worker_sock = socket.socketpair()
    host = WorkerHost(engine, BlockingChannel(worker_sock))
    thread = threading.Thread(target=host.run, daemon=True)
    thread.start()
    yield Server(server_sock), engine
    server_sock.close()
    thread.join(10)
    assert not thread.is_alive(), "the worker did not exit when the server went away"


def _add(
    request_id: str, prompt: str, max_tokens: int = 1_000_000, stop: tuple[str, ...] = ()
) -> Add:
    return Add(
        request_id=request_id, prompt=prompt, sampling=Sampling(max_tokens=max_tokens, stop=stop)
    )


def test_requests_stream_side_by_side_and_finish(running: tuple[Server, ScriptedEngine]) -> None:
    server, _ = running
    server.send(_add("r1", "a"), _add("r2", "b"), _add("r3", "b", max_tokens=3))
    done = server.collect({"r1", "r2", "r3"})
    assert done["r1"] == ("肺炎 pneumonia 🙂 END tail", "stop")
    assert done["r2"] == ("short", "stop")
    assert done["r3"] == ("sho", "length")


def test_one_outputs_message_per_step_carries_every_request(
    running: tuple[Server, ScriptedEngine],
) -> None:
    server, _ = running
    server.send(_add("r1", "b"), _add("r2", "b"))
    first = server.receive()
    assert isinstance(first, Outputs)
    assert sorted(d.request_id for d in first.deltas) == ["r1", "r2"]


def test_stop_string_ends_the_request_and_frees_it_in_the_engine(
    running: tuple[Server, ScriptedEngine],
) -> None:
    server, engine = running
    server.send(_add("r1", "a", stop=("END",)))
    assert server.collect({"r1"}) == {"r1": ("肺炎 pneumonia 🙂 ", "stop")}
    assert engine.aborted == ["r1"]


def test_abort_frees_the_request_and_others_continue(
    running: tuple[Server, ScriptedEngine],
) -> None:
    server, engine = running
    server.send(_add("gone", "long"), _add("kept", "long"))
    server.receive()
    server.send(Abort("gone"), StatsQuery("after-abort"))
    while not isinstance(reply := server.receive(), StatsReply):
        pass
    assert reply.stats["running_requests"] == 1
    assert engine.aborted == ["gone"] and list(engine.positions) == ["kept"]
    later = server.receive()
    assert isinstance(later, Outputs) and [d.request_id for d in later.deltas] == ["kept"]


def test_a_failing_request_is_isolated(running: tuple[Server, ScriptedEngine]) -> None:
    server, engine = running
    server.send(_add("bad", "bad"), _add("good", "b"), _add("unknown", "zzz"))
    done = server.collect({"bad", "good", "unknown"})
    assert done["bad"][0] == "backend" and "undecodable" in str(done["bad"][1])
    assert done["unknown"][0] == "invalid_prompt"
    assert done["good"] == ("short", "stop")
    assert "bad" in engine.aborted


def test_a_failed_step_fails_every_running_request(
    running: tuple[Server, ScriptedEngine],
) -> None:
    server, engine = running
    engine.fail_when_running = 2
    server.send(_add("r1", "long"), _add("r2", "long"))
    done = server.collect({"r1", "r2"})
    assert {kind for kind, _ in done.values()} == {"backend"}
    assert all("kernel exploded" in str(message) for _, message in done.values())


def test_stats_report_engine_and_host_counts(running: tuple[Server, ScriptedEngine]) -> None:
    server, _ = running
    server.send(StatsQuery("t1"))
    reply = server.receive()
    assert isinstance(reply, StatsReply) and reply.token == "t1"
    assert reply.stats["running_requests"] == 0 and reply.stats["engine_requests"] == 0
    server.send(_add("r1", "long"), StatsQuery("t2"))
    while not isinstance(reply := server.receive(), StatsReply):
        pass
    assert reply.stats["running_requests"] == 1 and reply.stats["kv_cache_usage"] == 0.5


def test_shutdown_fails_running_requests_and_exits(
    running: tuple[Server, ScriptedEngine],
) -> None:
    server, engine = running
    server.send(_add("r1", "long"))
    server.receive()
    server.send(Shutdown())
    done = server.collect({"r1"})
    assert done["r1"] == ("backend", "server is shutting down")
    assert engine.aborted == ["r1"]
