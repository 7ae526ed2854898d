"""OpenVINO GenAI backend: one worker process per served model, driven from the event loop.

A reader thread per worker turns pipe messages into items on per-request asyncio queues, so
the event loop never blocks on the engine.  Closing a request's stream early sends "abort",
which drops the GenAI handle and frees its KV blocks in the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog
from medserve.accel.base import (
    BackendError,
    BackendOverloaded,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    PromptTooLong,
)
from medserve.accel.openvino_worker import WorkerConfig, worker_main

log = structlog.get_logger("medserve.accel.openvino")

_DONE = object()


class _Worker:
    """The server-side half of one worker process; restarts the process if it dies."""

    def __init__(self, config: WorkerConfig, max_in_flight: int) -> None:
        self.config = config
        self.max_in_flight = max_in_flight
        self.info: ModelInfo | None = None
        self.alive = False
        self.restarts = 0
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._control: dict[str, asyncio.Queue[Any]] = {}
        """Replies to control messages (stats), kept apart so they never count as load."""
        self._send_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._startup_timeout_s = 600.0
        self._spawn()

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._ready = threading.Event()
        self._fatal: str | None = None
        self.process = context.Process(
            target=worker_main,
            args=(self.config, child_conn),
            name=f"medserve-ov-{self.config.model_name}",
            daemon=True,
        )
        self._child_conn: Connection = child_conn

    async def start(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._startup_timeout_s = timeout_s
        self.process.start()
        self._child_conn.close()  # the child holds its own copy; ours would keep EOF away
        conn = self._conn
        threading.Thread(
            target=self._read_loop,
            args=(conn,),
            name=f"ov-reader-{self.config.model_name}",
            daemon=True,
        ).start()
        started = time.monotonic()
        ready = await asyncio.to_thread(self._ready.wait, timeout_s)
        if self._fatal is not None:
            raise BackendError(f"model {self.config.model_name!r} failed to load: {self._fatal}")
        if not ready:
            self.process.kill()
            raise BackendError(
                f"model {self.config.model_name!r} did not load within {timeout_s:.0f} s "
                f"(raise engine.startup_timeout_s)"
            )
        log.info(
            "model_loaded",
            model=self.config.model_name,
            seconds=round(time.monotonic() - started, 2),
            pid=self.process.pid,
        )

    def _read_loop(self, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "ready":
                info = message[1]
                self.info = ModelInfo(
                    name=info["name"],
                    architecture=info["architecture"],
                    precision=info["precision"],
                    context_length=info["context_length"],
                    backend="openvino",
                    created=int(time.time()),
                )
                self.alive = True
                self._ready.set()
            elif kind == "fatal":
                self._fatal = message[1]
                self._ready.set()
            else:
                self._dispatch(message[1], message)
        # The process is gone: fail everything still waiting rather than hang the clients.
        was_serving = self.alive
        self.alive = False
        self._ready.set()
        for request_id in [*self._queues, *self._control]:
            self._dispatch(request_id, ("error", request_id, "backend", "inference worker exited"))
        if was_serving and not self._stopping and self._loop is not None:
            log.error("worker_exited", model=self.config.model_name, code=self.process.exitcode)
            asyncio.run_coroutine_threadsafe(self._restart(), self._loop)

    async def _restart(self) -> None:
        """Bring a crashed worker back, backing off so a crash loop does not spin the CPU."""
        while not self._stopping:
            delay = min(30.0, 2.0**self.restarts)
            self.restarts += 1
            log.warning(
                "worker_restarting",
                model=self.config.model_name,
                in_seconds=delay,
                restarts=self.restarts,
            )
            await asyncio.sleep(delay)
            await asyncio.to_thread(self.process.join, 5)
            self._spawn()
            try:
                await self.start(self._startup_timeout_s)
                return
            except BackendError as exc:
                log.error("worker_restart_failed", model=self.config.model_name, error=str(exc))

    def _dispatch(self, request_id: str, message: tuple[Any, ...]) -> None:
        queue = self._queues.get(request_id) or self._control.get(request_id)
        if queue is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(queue.put_nowait, message)

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self.alive:
            raise BackendError(f"model {request.model!r} is not running")
        if len(self._queues) >= self.max_in_flight:
            raise BackendOverloaded(
                f"{len(self._queues)} requests are already running or queued for "
                f"{request.model!r}; retry later"
            )
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[request.request_id] = queue
        payload = {
            "prompt": request.prompt,
            "messages": (
                [{"role": m.role, "content": m.content} for m in request.messages]
                if request.messages
                else None
            ),
            "params": asdict(request.params),
        }
        finished = False
        try:
            self.send(("add", request.request_id, payload))
            while True:
                message = await queue.get()
                if message[0] == "error":
                    finished = True
                    _, _, kind, text = message
                    if kind == "invalid_prompt":
                        raise PromptTooLong(text)
                    raise BackendError(text)
                _, _, text, finish_reason, num_prompt, num_completion = message
                finished = finish_reason is not None
                yield GenerationChunk(
                    text=text,
                    finish_reason=finish_reason,
                    num_prompt_tokens=num_prompt,
                    num_completion_tokens=num_completion,
                )
                if finished:
                    return
        finally:
            self._queues.pop(request.request_id, None)
            if not finished and self.alive:
                # Client went away, timed out, or the consumer stopped early: free the KV.
                self.send(("abort", request.request_id))

    def in_flight(self) -> int:
        return len(self._queues)

    async def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The engine's own view: running requests and KV-cache usage."""
        token = f"stats-{uuid.uuid4().hex}"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._control[token] = queue
        try:
            self.send(("stats", token))
            async with asyncio.timeout(timeout_s):
                message = await queue.get()
        finally:
            self._control.pop(token, None)
        if message[0] != "stats":
            raise BackendError(str(message[-1]))
        return {"in_flight": self.in_flight(), "restarts": self.restarts, **message[2]}

    async def stop(self) -> None:
        self._stopping = True
        if self.process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.send(("shutdown",))
            await asyncio.to_thread(self.process.join, 10)
            if self.process.is_alive():
                self.process.kill()
                await asyncio.to_thread(self.process.join, 5)
        self._conn.close()
        self.alive = False


def read_manifest(model_dir: Path) -> dict[str, Any]:
    manifest = model_dir / "medserve.json"
    if not manifest.is_file():
        raise BackendError(
            f"{model_dir} is not a prepared model folder (no medserve.json); "
            f"run `medserve setup` or check engine.models_dir"
        )
    return json.loads(manifest.read_text(encoding="utf-8"))


class OpenVINOBackend:
    name = "openvino"

    def __init__(
        self, model_dirs: dict[str, Path], *, config_template: WorkerConfig, max_in_flight: int
    ) -> None:
        self._workers: dict[str, _Worker] = {}
        for model_name, model_dir in model_dirs.items():
            read_manifest(model_dir)  # fail fast, before spawning anything
            config = WorkerConfig(
                **{**asdict(config_template), "model_name": model_name, "model_dir": str(model_dir)}
            )
            self._workers[model_name] = _Worker(config, max_in_flight)
        self._startup_timeout_s = 600.0

    def set_startup_timeout(self, seconds: float) -> None:
        self._startup_timeout_s = seconds

    async def start(self) -> None:
        # Load models one after another: two cold loads at once only fight over 2 cores.
        for worker in self._workers.values():
            await worker.start(self._startup_timeout_s)

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self._workers.values()))

    def models(self) -> list[ModelInfo]:
        return [w.info for w in self._workers.values() if w.info is not None]

    def ready(self) -> bool:
        return bool(self._workers) and all(w.alive for w in self._workers.values())

    def has_model(self, name: str) -> bool:
        return name in self._workers

    def in_flight(self) -> dict[str, int]:
        return {name: w.in_flight() for name, w in self._workers.items()}

    async def stats(self) -> dict[str, dict[str, Any]]:
        return {name: await w.stats() for name, w in self._workers.items() if w.alive}

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        worker = self._workers.get(request.model)
        if worker is None:
            raise BackendError(f"model {request.model!r} is not served")
        return worker.generate(request)
