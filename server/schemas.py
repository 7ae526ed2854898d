"""OpenAI-compatible request bodies, decoded and validated with msgspec.

Unknown fields are ignored (official clients send many we do not use); fields we cannot honour
with a different meaning (n > 1, tools) are rejected explicitly rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from medserve.server.errors import APIError
from medserve.server.json_body import decode_json

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, msgspec.Meta(ge=0)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
StopStrings = (
    str | Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=4)]
)


class TextPart(msgspec.Struct):
    type: str
    text: str | None = None


class Message(msgspec.Struct):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise APIError(
                    400,
                    f"content part type {part.type!r} is not supported; only 'text' is",
                    param="messages",
                )
            parts.append(part.text or "")
        return "".join(parts)


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: StopStrings | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    tools: list[Any] | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


T = TypeVar("T")


def decode_body(body: bytes, request_type: type[T]) -> T:
    """Decode and validate an OpenAI request body; unsupported options are a 400 too."""
    request = decode_json(body, request_type)
    _reject_unsupported(request)
    return request


def _reject_unsupported(request: Any) -> None:
    if request.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if isinstance(request, ChatCompletionRequest) and request.tools:
        raise APIError(400, "tool calling is not supported by this server", param="tools")
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if request.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if isinstance(request.prompt, list) and len(request.prompt) != 1:
            raise APIError(400, "send exactly one prompt per request", param="prompt")
