"""The backend the server uses: one engine worker process per served model.

Each model folder's manifest names its engine; the registry names the interpreter that runs
it. So one server can serve an OpenVINO model beside an ipex-llm one, each in its own
process and environment, behind the same API, supervision, back-pressure and cancel.

A served name is a link (``models_dir/<name>``, a symlink to the active version); its worker
is configured with the folder the link resolved to, so activating another version never
changes the files under a running worker. ``reload()`` resolves the links again and moves
each changed name to a new worker without dropping a request: the new worker loads beside the
old one, new requests go to it from one instant on, and the old one is stopped once the
requests it still runs have finished (or the drain timeout has passed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import structlog
from medserve.accel.base import BackendError, GenerationChunk, GenerationRequest, ModelInfo
from medserve.accel.protocol import Configure
from medserve.accel.registry import EngineNotInstalled, UnknownEngine, engine_entry, worker_python
from medserve.accel.worker_client import WorkerClient, WorkerSpec
from medserve.kv_cache.planner import KVPlanError, check_fits_in_memory
from medserve.models.manifest import ManifestError, read_manifest
from medserve.models.versions import VERSIONS_DIR

log = structlog.get_logger("medserve.accel.backend")

_DRAIN_POLL_S = 0.05


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
    drain_timeout_s: float = 30.0
    """On reload, how long a replaced worker may finish its requests before it is stopped."""
    total_ram_bytes: int | None = None
    """RAM the memory check budgets against; None: this machine's (tests set it)."""


ReloadResult = TypedDict(
    "ReloadResult",
    {
        "status": Literal["switched", "unchanged", "failed"],
        "from": str,
        "to": str,
        "error": str | None,
    },
)
"""One model's outcome: the folder served before and the one the link points to now."""


class ReloadBusy(BackendError):
    """Another reload is running (asked not to wait for it)."""


def version_of(model_dir: Path | str) -> str | None:
    """The version id of a folder under ``.versions/<name>/``; None for a plain folder."""
    path = Path(model_dir)
    return path.name if path.parent.parent.name == VERSIONS_DIR else None


class WorkerBackend:
    def __init__(
        self,
        workers: Mapping[str, WorkerClient],
        *,
        links: Mapping[str, Path] | None = None,
        settings: BackendSettings | None = None,
    ) -> None:
        self._workers = dict(workers)
        self._links = dict(links or {})
        """Served name -> the path resolved again on each reload (``models_dir/<name>``)."""
        self._settings = settings or BackendSettings()
        self._retiring: dict[asyncio.Task[None], WorkerClient] = {}
        self._starting: set[WorkerClient] = set()
        # Start-up holds it too: a SIGHUP during the first load waits, then reloads.
        self._reload_lock = asyncio.Lock()
        self._stopping = False

    async def start(self) -> None:
        async with self._reload_lock:
            # One after another: two cold loads at once only fight over the cores.
            for worker in self._workers.values():
                await worker.start()

    async def stop(self) -> None:
        self._stopping = True  # retiring workers stop waiting for their drain
        await asyncio.gather(
            *(w.stop() for w in [*self._workers.values(), *self._starting]),
            *self._retiring,
        )

    def models(self) -> list[ModelInfo]:
        return [
            dataclasses.replace(w.info, version=version_of(w.spec.configure.model_dir))
            for w in self._workers.values()
            if w.info is not None
        ]

    def ready(self) -> bool:
        return bool(self._workers) and all(w.alive for w in self._workers.values())

    def has_model(self, name: str) -> bool:
        return name in self._workers

    def in_flight(self) -> dict[str, int]:
        counts = {name: w.in_flight() for name, w in self._workers.items()}
        for old in self._retiring.values():  # still running requests of that model
            counts[old.name] = counts.get(old.name, 0) + old.in_flight()
        return counts

    async def stats(self) -> dict[str, dict[str, Any]]:
        return {name: await w.stats() for name, w in self._workers.items() if w.alive}

    def served_from(self) -> dict[str, Path]:
        """The resolved folder each model's current worker was started on."""
        return {name: Path(w.spec.configure.model_dir) for name, w in self._workers.items()}

    def worker(self, name: str) -> WorkerClient:
        try:
            return self._workers[name]
        except KeyError:
            raise BackendError(f"model {name!r} is not served") from None

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        # Binds the request to the worker serving now: a reload later does not move it.
        return self.worker(request.model).generate(request)

    @property
    def reload_running(self) -> bool:
        return self._reload_lock.locked()

    async def reload(self, *, wait: bool = True) -> dict[str, ReloadResult]:
        """Serve each model from the folder its link points to now; a report per model.

        Reloads run one at a time: with ``wait`` a second one waits for the first (and then
        sees any activation made meanwhile), without it ReloadBusy is raised at once.
        """
        if self._stopping:
            raise BackendError("the server is stopping")
        if not wait and self._reload_lock.locked():
            raise ReloadBusy("a reload is already running; retry when it has finished")
        async with self._reload_lock:
            report: dict[str, ReloadResult] = {}
            for name in self._workers:
                report[name] = await self._reload_one(name)
            return report

    async def _reload_one(self, name: str) -> ReloadResult:
        old = self._workers[name]
        loaded = old.spec.configure.model_dir
        link = self._links.get(name)
        target = os.path.realpath(link) if link is not None else loaded
        result: ReloadResult = {"status": "unchanged", "from": loaded, "to": target, "error": None}
        if target == loaded:
            return result
        new: WorkerClient | None = None
        try:
            spec = worker_spec(name, Path(target), self._settings)
            self._check_memory(name, Path(target))
            new = WorkerClient(spec)
            self._starting.add(new)
            await new.start()
            if self._stopping:
                raise BackendError("the server is stopping")
        except (BackendError, KVPlanError, OSError) as exc:
            if new is not None:
                await new.stop()  # reap a process that failed to load
            return {**result, "status": "failed", "error": str(exc)}
        finally:
            if new is not None:
                self._starting.discard(new)
        self._workers[name] = new  # from here on new requests go to the new folder
        task = asyncio.create_task(self._retire(old), name=f"retire-{name}")
        self._retiring[task] = old
        task.add_done_callback(lambda done: self._retiring.pop(done, None))
        return {**result, "status": "switched"}

    async def _retire(self, old: WorkerClient) -> None:
        """Let the replaced worker finish what it runs, then stop it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.drain_timeout_s
        while old.in_flight() and not self._stopping and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        left = old.in_flight()
        if left:
            # Past the drain timeout (or shutting down): the rest fail as in a worker crash.
            log.warning("retire_drain_timeout", model=old.name, in_flight=left)
        pid = old.pid
        try:
            await old.stop()
        except Exception as exc:  # a background task: log it, never lose it silently
            log.error("worker_retire_failed", model=old.name, error=type(exc).__name__)
            return
        log.info(
            "worker_retired",
            model=old.name,
            version=version_of(old.spec.configure.model_dir),
            pid=pid,
        )

    def _check_memory(self, name: str, target: Path) -> None:
        # Until the old worker has drained, both versions are loaded: budget for that peak.
        loaded = {f"{n} (serving)": path for n, path in self.served_from().items()}
        for i, old in enumerate(self._retiring.values()):
            loaded[f"{old.name} (retiring {i})"] = Path(old.spec.configure.model_dir)
        try:
            check_fits_in_memory(
                {**loaded, f"{name} (new)": target},
                self._settings.kv_cache_gb,
                total_ram=self._settings.total_ram_bytes,
            )
        except KVPlanError as exc:
            raise KVPlanError(
                f"model {name!r}: {target} does not fit in memory beside the running workers "
                f"(old and new version are loaded together until the old one drains): {exc}"
            ) from None


def worker_spec(name: str, model_dir: Path, settings: BackendSettings) -> WorkerSpec:
    """How to start a worker serving ``model_dir`` as ``name``; BackendError if it cannot.

    Everything checkable without starting a process is checked here (manifest, engine known
    and installed, format), so a bad folder fails with one clear message, at start-up and on
    reload alike.
    """
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
    return WorkerSpec(
        configure=configure,
        python=python,
        max_in_flight=settings.max_num_seqs + settings.max_queue,
        startup_timeout_s=settings.startup_timeout_s,
    )


def build_backend(model_dirs: Mapping[str, Path], settings: BackendSettings) -> WorkerBackend:
    """A backend for these model folders; BackendError names any folder that cannot serve.

    Workers get the resolved folder (a version link followed once, now); the links are kept
    for ``reload()``.
    """
    links = {name: Path(path) for name, path in model_dirs.items()}
    workers = {
        name: WorkerClient(worker_spec(name, Path(os.path.realpath(link)), settings))
        for name, link in links.items()
    }
    return WorkerBackend(workers, links=links, settings=settings)
