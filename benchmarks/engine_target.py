"""Benchmark targets without HTTP: the engine core in-process, or its worker process direct.

Three levels of the same serving path, each measured with the same workload, so their
differences show where time goes:

- ``EngineCoreTarget`` ("core"): the engine core (accel/engine_core.py) loaded in this
  process and stepped by a dedicated thread; token times are taken as each step returns. No
  detokenization, no process boundary: what the engine itself can do.
- ``WorkerTarget`` ("worker"): the real worker process of the model's engine, driven through
  the server's own WorkerClient: adds the protocol, detokenization and stop handling, and
  works for every engine, in whatever virtual environment it runs.
- the HTTP target (benchmarks/http_target.py): adds the server and the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medserve.accel.base import BackendError, GenerationRequest, Sampling, Turn
from medserve.accel.engine_core import EngineCore, InvalidPrompt, PromptInput
from medserve.accel.protocol import Configure
from medserve.accel.registry import load_engine, worker_python
from medserve.accel.worker_client import WorkerClient, WorkerSpec
from medserve.accel.worker_host import step_figures
from medserve.benchmarks.target import Completion, TargetError
from medserve.benchmarks.workloads import WorkloadRequest
from medserve.models.manifest import read_manifest

_ids = itertools.count()


def engine_configure(
    model_dir: Path, *, max_num_seqs: int, kv_cache_gb: float, options: dict[str, Any]
) -> Configure:
    manifest = read_manifest(model_dir)
    return Configure(
        model_name=model_dir.name,
        model_dir=str(model_dir),
        engine=manifest.engine,
        max_num_seqs=max_num_seqs,
        max_context_tokens=max(manifest.context_length, 4096) or 4096,
        kv_cache_gb=kv_cache_gb,
        options=options,
    )


def _describe(kind: str, configure: Configure) -> dict[str, Any]:
    return {
        "kind": kind,
        "model": configure.model_name,
        "engine": configure.engine,
        "model_dir": configure.model_dir,
        "options": dict(configure.options),
        "max_num_seqs": configure.max_num_seqs,
    }


def _prompt_input(request_id: str, request: WorkloadRequest) -> PromptInput:
    return PromptInput(
        request_id=request_id,
        sampling=Sampling(max_tokens=request.max_tokens, temperature=request.temperature),
        messages=tuple(Turn(role, content) for role, content in request.messages),
    )


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Completion]
    prompt_tokens: int = 0
    token_times: list[float] = field(default_factory=list)


class EngineCoreTarget:
    """The engine core in this process, stepped as fast as it can go by one thread."""

    def __init__(self, name: str, configure: Configure) -> None:
        self.name = name
        self._configure = configure
        self._engine: EngineCore = load_engine(configure)
        self._inbox: queue.SimpleQueue[tuple[str, PromptInput, _Pending] | None] = (
            queue.SimpleQueue()
        )
        self._pending: dict[str, _Pending] = {}
        self._step_seconds: deque[float] = deque(maxlen=100_000)
        self._thread = threading.Thread(target=self._drive, name=f"engine-{name}", daemon=True)
        self._thread.start()

    def describe(self) -> dict[str, Any]:
        return {**_describe("engine-core", self._configure), **step_figures(self._step_seconds)}

    async def generate(self, request: WorkloadRequest) -> Completion:
        loop = asyncio.get_running_loop()
        pending = _Pending(loop, loop.create_future())
        request_id = f"bench-{next(_ids)}"
        self._inbox.put((request_id, _prompt_input(request_id, request), pending))
        return await pending.future

    def _drive(self) -> None:
        engine = self._engine
        while True:
            # Block only when idle; while generating, take new requests between steps.
            block = not engine.has_work()
            try:
                while True:
                    item = self._inbox.get(block=block)
                    block = False
                    if item is None:
                        return
                    self._add(*item)
            except queue.Empty:
                pass
            if not engine.has_work():
                continue
            started = time.perf_counter()
            outputs = engine.step()
            now = time.perf_counter()
            if any(output.token_ids for output in outputs):
                self._step_seconds.append(now - started)
            for output in outputs:
                pending = self._pending.get(output.request_id)
                if pending is None:
                    continue
                pending.token_times.extend([now] * len(output.token_ids))
                if output.finish_reason is not None:
                    del self._pending[output.request_id]
                    self._resolve(pending, None)

    def _add(self, request_id: str, prompt: PromptInput, pending: _Pending) -> None:
        try:
            pending.prompt_tokens = self._engine.add(prompt)
        except InvalidPrompt as exc:
            self._resolve(pending, TargetError(f"invalid prompt: {exc}"))
            return
        self._pending[request_id] = pending

    @staticmethod
    def _resolve(pending: _Pending, error: Exception | None) -> None:
        def settle() -> None:
            if pending.future.done():
                return
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(
                    Completion(
                        pending.token_times,
                        prompt_tokens=pending.prompt_tokens,
                        completion_tokens=len(pending.token_times),
                    )
                )

        pending.loop.call_soon_threadsafe(settle)

    async def aclose(self) -> None:
        self._inbox.put(None)
        await asyncio.to_thread(self._thread.join, 30)
        self._engine.close()


class WorkerTarget:
    """The model's real worker process, driven through the server's WorkerClient."""

    def __init__(self, name: str, configure: Configure, max_in_flight: int = 256) -> None:
        self.name = name
        self._configure = configure
        self._final_stats: dict[str, Any] = {}
        self._client = WorkerClient(
            WorkerSpec(
                configure=configure,
                python=worker_python(configure.engine),
                max_in_flight=max_in_flight,
            )
        )

    async def start(self) -> None:
        await self._client.start()

    def describe(self) -> dict[str, Any]:
        steps = {k: v for k, v in self._final_stats.items() if k.startswith("step_ms")}
        return {**_describe("engine-worker", self._configure), **steps}

    async def generate(self, request: WorkloadRequest) -> Completion:
        generation = GenerationRequest(
            request_id=f"bench-{next(_ids)}",
            model=self._configure.model_name,
            params=Sampling(max_tokens=request.max_tokens, temperature=request.temperature),
            messages=tuple(Turn(role, content) for role, content in request.messages),
        )
        times: list[float] = []
        last = None
        try:
            async for chunk in self._client.generate(generation):
                if chunk.text:
                    times.append(time.perf_counter())
                last = chunk
        except BackendError as exc:
            raise TargetError(str(exc)) from None
        return Completion(
            times,
            prompt_tokens=last.num_prompt_tokens if last else None,
            completion_tokens=last.num_completion_tokens if last else None,
        )

    async def aclose(self) -> None:
        with contextlib.suppress(BackendError, TimeoutError):
            self._final_stats = await self._client.stats()
        await self._client.stop()
