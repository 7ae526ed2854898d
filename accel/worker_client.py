"""The server's side of one engine worker process: spawn, supervise, admit, stream.

The worker's socket is read by the event loop itself (no reader thread): one Outputs message
per engine step is decoded once and its deltas are put on the waiting requests' queues, so
the loop wakes once per step however many streams run. If the process dies (OOM kill,
native crash), every request in flight fails at once with BackendError, never a hang, and
the worker is restarted with back-off (1 s, 2 s, 4 s ... 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog
from medserve.accel.base import (
    BackendError,
    BackendOverloaded,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    PromptTooLong,
)
from medserve.accel.cpu_features import illegal_instruction_advice
from medserve.accel.protocol import (
    HEADER_SIZE,
    Abort,
    Add,
    Configure,
    Delta,
    Failed,
    Fatal,
    Outputs,
    Ready,
    Shutdown,
    StatsQuery,
    StatsReply,
    encode_frame,
    frame_length,
    from_worker_decoder,
)

log = structlog.get_logger("medserve.accel.worker")

_EXITED = Failed("", "backend", "inference worker exited")


@dataclass(frozen=True)
class WorkerSpec:
    configure: Configure
    python: Path
    """Interpreter of the engine's virtual environment."""
    max_in_flight: int
    """Admitted requests (running + queued) beyond which new ones get BackendOverloaded."""
    startup_timeout_s: float = 600.0


class WorkerClient:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.name = spec.configure.model_name
        self.info: ModelInfo | None = None
        self.alive = False
        self.restarts = 0
        self._queues: dict[str, asyncio.Queue[Delta | Failed]] = {}
        self._stats_waiters: dict[str, asyncio.Future[StatsReply]] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        """Spawn the worker and wait until its model is loaded (or raise BackendError)."""
        started = time.monotonic()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                [str(self.spec.python), "-m", "medserve.accel.worker", "--fd", str(child.fileno())],
                pass_fds=(child.fileno(),),
                env=_worker_env(),
            )
        finally:
            child.close()  # the child holds its own copy; ours would keep EOF away
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        self._send(self.spec.configure)
        try:
            async with asyncio.timeout(self.spec.startup_timeout_s):
                first = await _read_message(reader)
        except TimeoutError:
            self._kill()
            raise BackendError(
                f"model {self.name!r} did not load within {self.spec.startup_timeout_s:.0f} s "
                f"(raise engine.startup_timeout_s)"
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            code = await asyncio.to_thread(self._process.wait, 10)
            if code == -signal.SIGILL:
                # A native engine built for another CPU (AVX-512 wheel on an AVX2 box).
                advice = illegal_instruction_advice(self.spec.configure.engine)
                raise BackendError(f"model {self.name!r}: {advice}") from None
            raise BackendError(
                f"model {self.name!r}: worker exited with code {code} while loading"
            ) from None
        if isinstance(first, Fatal):
            await asyncio.to_thread(self._process.wait, 10)
            raise BackendError(f"model {self.name!r} failed to load: {first.message}")
        if not isinstance(first, Ready):
            self._kill()
            raise BackendError(f"model {self.name!r}: worker sent {type(first).__name__} first")
        model = first.model
        self.info = ModelInfo(
            name=model.name,
            architecture=model.architecture,
            precision=model.precision,
            context_length=model.context_length,
            backend=model.engine,
            created=int(time.time()),
            structured_output=model.structured_output,
            template_tools=model.template_tools,
        )
        self.alive = True
        self._reader_task = asyncio.create_task(self._read_loop(reader), name=f"read-{self.name}")
        log.info(
            "model_loaded",
            model=self.name,
            engine=model.engine,
            seconds=round(time.monotonic() - started, 2),
            pid=model.pid,
        )

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await _read_message(reader)
                if isinstance(message, Outputs):
                    for delta in message.deltas:
                        queue = self._queues.get(delta.request_id)
                        if queue is not None:
                            queue.put_nowait(delta)
                elif isinstance(message, Failed):
                    queue = self._queues.get(message.request_id)
                    if queue is not None:
                        queue.put_nowait(message)
                elif isinstance(message, StatsReply):
                    waiter = self._stats_waiters.get(message.token)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError, ValueError):
            pass
        self._on_exit()

    def _on_exit(self) -> None:
        # The process is gone: fail everything still waiting rather than hang the clients.
        was_serving = self.alive
        self.alive = False
        for queue in self._queues.values():
            queue.put_nowait(_EXITED)
        for waiter in self._stats_waiters.values():
            if not waiter.done():
                waiter.set_exception(BackendError("inference worker exited"))
        if self._writer is not None:
            self._writer.close()
        if was_serving and not self._stopping:
            code = self._process.poll() if self._process else None
            if code == -signal.SIGILL:
                log.error(
                    "worker_exited",
                    model=self.name,
                    code=code,
                    reason=illegal_instruction_advice(self.spec.configure.engine),
                )
            else:
                log.error("worker_exited", model=self.name, code=code)
            asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        """Bring a crashed worker back, backing off so a crash loop does not spin the CPU."""
        while not self._stopping:
            delay = min(30.0, 2.0**self.restarts)
            self.restarts += 1
            log.warning(
                "worker_restarting", model=self.name, in_seconds=delay, restarts=self.restarts
            )
            await asyncio.sleep(delay)
            if self._stopping:
                return  # stopped (or retired by a reload) while waiting: start nothing
            if self._process is not None:
                await asyncio.to_thread(self._reap, self._process)
            try:
                await self.start()
                return
            except BackendError as exc:
                log.error("worker_restart_failed", model=self.name, error=str(exc))

    def _send(self, message: msgspec.Struct) -> None:
        if self._writer is None or self._writer.is_closing():
            raise BackendError(f"model {self.name!r} is not running")
        self._writer.write(encode_frame(message))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self.alive:
            raise BackendError(f"model {request.model!r} is not running")
        if len(self._queues) >= self.spec.max_in_flight:
            raise BackendOverloaded(
                f"{len(self._queues)} requests are already running or queued for "
                f"{request.model!r}; retry later"
            )
        queue: asyncio.Queue[Delta | Failed] = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = False
        try:
            self._send(
                Add(
                    request_id=request.request_id,
                    sampling=request.params,
                    prompt=request.prompt,
                    messages=request.messages or None,
                    tools=request.tools,
                )
            )
            while not finished:
                message = await queue.get()
                if isinstance(message, Failed):
                    finished = True
                    if message.kind == "invalid_prompt":
                        raise PromptTooLong(message.message)
                    raise BackendError(message.message)
                finished = message.finish_reason is not None
                yield GenerationChunk(
                    text=message.text,
                    finish_reason=message.finish_reason,
                    num_prompt_tokens=message.num_prompt_tokens,
                    num_completion_tokens=message.num_completion_tokens,
                )
        finally:
            self._queues.pop(request.request_id, None)
            if not finished and self.alive:
                # Client went away, timed out, or the consumer stopped early: free the KV.
                with contextlib.suppress(BackendError):
                    self._send(Abort(request.request_id))

    def in_flight(self) -> int:
        return len(self._queues)

    async def stats(self, timeout_s: float = 10.0) -> dict[str, object]:
        """The engine's own view: running requests and KV-cache usage."""
        token = uuid.uuid4().hex
        waiter: asyncio.Future[StatsReply] = asyncio.get_running_loop().create_future()
        self._stats_waiters[token] = waiter
        try:
            self._send(StatsQuery(token))
            async with asyncio.timeout(timeout_s):
                reply = await waiter
        finally:
            self._stats_waiters.pop(token, None)
        identity = (
            {"engine": self.info.backend, "precision": self.info.precision} if self.info else {}
        )
        return {"in_flight": self.in_flight(), "restarts": self.restarts, **identity, **reply.stats}

    async def stop(self) -> None:
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(BackendError, ConnectionError):
                self._send(Shutdown())
                if self._writer is not None:
                    await self._writer.drain()
            await asyncio.to_thread(self._reap, process)
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self.alive = False

    def kill(self) -> None:
        """For tests and emergencies: the worker dies as in an OOM kill."""
        self._kill()

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    @staticmethod
    def _reap(process: subprocess.Popen[bytes]) -> None:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def _read_message(reader: asyncio.StreamReader) -> object:
    header = await reader.readexactly(HEADER_SIZE)
    payload = await reader.readexactly(frame_length(header))
    return from_worker_decoder.decode(payload)


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # Workers never look anything up on a model hub, and tools they load send no telemetry.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env
