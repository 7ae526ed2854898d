"""What request handlers need from the running server, injected as the `runtime` dependency."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from medserve.accel.base import Backend
from medserve.server.errors import APIError


@dataclass
class ServerState:
    backend: Backend | None
    default_model: str
    default_max_tokens: int
    request_timeout_s: float
    readiness: dict[str, Callable[[], bool]] = field(default_factory=dict)
    """Named checks for /ready, one per component (LLM backend, case index...)."""

    def require_backend(self) -> Backend:
        if self.backend is None:
            raise APIError(
                404,
                "this server runs without a language model (engine.enabled = false)",
                code="model_not_found",
            )
        return self.backend

    def components_ready(self) -> dict[str, bool]:
        return {name: check() for name, check in self.readiness.items()}
