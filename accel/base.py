"""The one small interface every inference backend implements.

The server speaks only these types; it never imports openvino, ipex-llm or chatglm-cpp itself.
A backend turns a GenerationRequest into a stream of GenerationChunks and must free the
request's KV cache when the stream is closed early (client disconnect, timeout, stop string).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


class BackendError(Exception):
    """The backend could not serve a request (not the client's fault)."""


class BackendOverloaded(BackendError):
    """Too many requests are queued; the client should retry later."""


class PromptTooLong(Exception):
    """The prompt does not fit the model's context; the client must shorten it."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k filtering."""
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str
    params: SamplingParams
    prompt: str | None = None
    """Raw completion prompt, used as is."""
    messages: tuple[ChatMessage, ...] = field(default_factory=tuple)
    """Chat turns; the backend applies the model's chat template."""


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
    created: int = 0


class Backend(Protocol):
    """What the server needs from an inference engine."""

    name: str

    async def start(self) -> None:
        """Load models; return when the backend can serve (or raise BackendError)."""

    async def stop(self) -> None:
        """Abort running requests and release every resource."""

    def models(self) -> list[ModelInfo]: ...

    def ready(self) -> bool:
        """True while requests can be served."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the completion.  Closing the iterator early aborts the request."""
        ...
