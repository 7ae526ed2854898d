"""The backend the server uses: one engine worker process per served model.

Each model folder's manifest names its engine; the registry names the interpreter that runs
it. So one server can serve an OpenVINO model beside an ipex-llm one, each in its own
process and environment, behind the same API, supervision, back-pressure and cancel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medserve.accel.base import BackendError, GenerationChunk, GenerationRequest, ModelInfo
from medserve.accel.protocol import Configure
from medserve.accel.registry import EngineNotInstalled, UnknownEngine, engine_entry, worker_python
from medserve.accel.worker_client import WorkerClient, WorkerSpec
from medserve.models.manifest import ManifestError, read_manifest


@dataclass(frozen=True)
class BackendSettings:
    max_num_seqs: int = 8
    max_queue: int = 64
    max_context_tokens: int = 4096
    kv_cache_gb: float = 1.0
    startup_timeout_s: float = 600.0
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    """Passed to every engine; each reads the options it knows (see its module)."""
    venvs_root: Path | None = None
    """Folder holding the engines' virtual environments; default: beside the server's."""


class WorkerBackend:
    def __init__(self, workers: Mapping[str, WorkerClient]) -> None:
        self._workers = dict(workers)

    async def start(self) -> None:
        # Load models one after another: two cold loads at once only fight over the cores.
        for worker in self._workers.values():
            await worker.start()

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

    def worker(self, name: str) -> WorkerClient:
        try:
            return self._workers[name]
        except KeyError:
            raise BackendError(f"model {name!r} is not served") from None

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self.worker(request.model).generate(request)


def build_backend(model_dirs: Mapping[str, Path], settings: BackendSettings) -> WorkerBackend:
    """A backend for these model folders; BackendError names any folder that cannot serve.

    Everything checkable without starting a process is checked here (manifest, engine known
    and installed), so a bad configuration fails at start-up with one clear message.
    """
    workers: dict[str, WorkerClient] = {}
    for name, model_dir in model_dirs.items():
        try:
            manifest = read_manifest(model_dir)
            entry = engine_entry(manifest.engine)
            python = worker_python(entry.name, settings.venvs_root)
        except (ManifestError, UnknownEngine, EngineNotInstalled) as exc:
            raise BackendError(f"model {name!r}: {exc}") from None
        if manifest.format not in entry.formats:
            raise BackendError(
                f"model {name!r}: engine {entry.name!r} cannot serve format "
                f"{manifest.format!r} (it serves {', '.join(entry.formats)})"
            )
        configure = Configure(
            model_name=name,
            model_dir=str(model_dir),
            engine=entry.name,
            max_num_seqs=settings.max_num_seqs,
            max_context_tokens=settings.max_context_tokens,
            kv_cache_gb=settings.kv_cache_gb,
            options=dict(settings.engine_options),
        )
        workers[name] = WorkerClient(
            WorkerSpec(
                configure=configure,
                python=python,
                max_in_flight=settings.max_num_seqs + settings.max_queue,
                startup_timeout_s=settings.startup_timeout_s,
            )
        )
    return WorkerBackend(workers)
