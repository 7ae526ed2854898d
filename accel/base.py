"""The one small interface between the server and inference: requests in, text chunks out.

The server speaks only these types; it never imports openvino, ipex-llm or llama.cpp, and
does not know which engine serves a model. A backend turns a GenerationRequest into a stream
of GenerationChunks and must free the request's KV cache when the stream is closed early
(client disconnect, timeout, stop string).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from medserve.accel.protocol import CalledTool, FinishReason, Sampling, Turn

__all__ = [
    "Backend",
    "BackendError",
    "BackendOverloaded",
    "CalledTool",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "ModelInfo",
    "PromptTooLong",
    "Sampling",
    "Turn",
]


class BackendError(Exception):
    """The backend could not serve a request (not the client's fault)."""


class BackendOverloaded(BackendError):
    """Too many requests are queued; the client should retry later."""


class PromptTooLong(Exception):
    """The prompt does not fit the model's context (or is empty); the client must change it."""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str
    params: Sampling
    prompt: str | None = None
    """Raw completion prompt, used as is."""
    messages: tuple[Turn, ...] = field(default_factory=tuple)
    """Chat turns; the engine applies the model's chat template."""
    tools: tuple[dict[str, Any], ...] = ()
    """OpenAI function tools the chat template describes (only if ModelInfo.template_tools)."""


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of generated text; the last chunk of a stream carries finish_reason and usage."""

    text: str
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    precision: str
    context_length: int
    backend: str
    """The engine serving the model (openvino, ipex-llm, ...)."""
    created: int = 0
    version: str | None = None
    """The model version served (``models_dir/.versions/<name>/<version>``); None if unversioned."""
    structured_output: bool = False
    """The engine enforces Sampling.json_schema by constrained decoding."""
    template_tools: bool = False
    """The model's chat template describes tools and writes calls in its own syntax."""


class Backend(Protocol):
    """What the server needs from inference, whatever engines are behind it."""

    async def start(self) -> None:
        """Load models; return when every model can serve (or raise BackendError)."""

    async def stop(self) -> None:
        """Abort running requests and release every resource."""

    def models(self) -> list[ModelInfo]:
        """The models loaded now (a restarting model is listed with its last info)."""
        ...

    def ready(self) -> bool:
        """True while every model can serve."""
        ...

    def has_model(self, name: str) -> bool: ...

    def in_flight(self) -> dict[str, int]:
        """Admitted requests (running or queued) per model."""
        ...

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Per model: the engine's own load figures (KV-cache usage 0-1, requests, pid...)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the completion.  Closing the iterator early aborts the request."""
        ...
