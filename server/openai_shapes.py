"""Response bodies and SSE events in the exact shapes the official OpenAI clients parse."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from medserve.accel.base import GenerationChunk, GenerationRequest
from medserve.server.tool_calls import ToolCalls

_PLACEHOLDER = "\x00"
_ENCODED_PLACEHOLDER = msgspec.json.encode(_PLACEHOLDER)


class ResponseBuilder:
    """Builds response bodies in the exact shapes the OpenAI clients parse."""

    def __init__(
        self,
        generation: GenerationRequest,
        *,
        chat: bool,
        created: int,
        fingerprint: str | None = None,
        calls: ToolCalls | None = None,
    ) -> None:
        self.id = generation.request_id
        self.calls = calls
        """Tools of the request: text that is a call becomes ``tool_calls``."""
        self.model = generation.model
        self.chat = chat
        self.created = created
        self.fingerprint = fingerprint
        """``system_fingerprint``: the model version that generates the answer."""
        # A streamed answer is one event per token: encode the envelope once and splice each
        # token's text into it, instead of building and encoding a nested dict per token.
        template = msgspec.json.encode(self.delta_event(text=_PLACEHOLDER))
        before, after = template.split(_ENCODED_PLACEHOLDER)
        self._text_event_head = b"data: " + before
        self._text_event_tail = after + b"\n\n"

    def text_event(self, text: str) -> bytes:
        """The SSE event carrying ``text``: byte for byte ``data: <delta_event(text)>``."""
        return self._text_event_head + msgspec.json.encode(text) + self._text_event_tail

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }

    @staticmethod
    def _usage(chunk: GenerationChunk) -> dict[str, int]:
        return {
            "prompt_tokens": chunk.num_prompt_tokens,
            "completion_tokens": chunk.num_completion_tokens,
            "total_tokens": chunk.num_prompt_tokens + chunk.num_completion_tokens,
        }

    def full(self, text: str, last: GenerationChunk) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            finish_reason: str | None = last.finish_reason
            tool_calls = self.calls.parse(text) if self.calls else None
            if tool_calls:
                message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
                finish_reason = "tool_calls"
            choice = {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {
                "index": 0,
                "text": text,
                "finish_reason": last.finish_reason,
                "logprobs": None,
            }
            body = self._envelope("text_completion", [choice])
        body["usage"] = self._usage(last)
        return body

    def content_event(self, text: str) -> tuple[bytes, str | None]:
        """The event for ``text`` and the finish reason it implies ("tool_calls" for a call)."""
        tool_calls = self.calls.parse(text) if self.calls else None
        if not tool_calls:
            return self.text_event(text), None
        delta = {"tool_calls": [{"index": 0, **call} for call in tool_calls]}
        choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
        event = self._envelope("chat.completion.chunk", [choice])
        return b"data: " + msgspec.json.encode(event) + b"\n\n", "tool_calls"

    def delta_event(
        self, *, text: str = "", role: bool = False, finish_reason: str | None = None
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text:
                delta = {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self._envelope("text_completion", [choice])

    def usage_event(self, last: GenerationChunk) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = self._usage(last)
        return body


# -- Documented shapes --------------------------------------------------------------------
# The builder above writes dicts (faster than Structs on the streaming path); these Structs
# describe the same bodies for the OpenAPI document, and the schemathesis test checks every
# response against them.

FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CalledFunction(msgspec.Struct):
    name: str
    arguments: str
    """JSON text, valid against the tool's ``parameters``."""


class ToolCallOut(msgspec.Struct):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ToolCallDelta(ToolCallOut):
    index: int


class AssistantMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str | None
    """None when the answer is ``tool_calls``."""
    tool_calls: list[ToolCallOut] | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: None


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(msgspec.Struct):
    role: Literal["assistant"] | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET
    tool_calls: list[ToolCallDelta] | msgspec.UnsetType = msgspec.UNSET


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: None


class ChatCompletionChunk(msgspec.Struct):
    """One server-sent event of a streamed chat completion (``data: <this JSON>``)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChunkChoice]
    usage: Usage | msgspec.UnsetType = msgspec.UNSET
    """Only in the last event before ``[DONE]``, with stream_options.include_usage."""


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None


class Completion(msgspec.Struct):
    """A completion; streamed, each event carries one of these (usage only in the last)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage | msgspec.UnsetType = msgspec.UNSET


class ModelCard(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    version: str | None = None
    """The installed version serving the model (``medserve models``); null for a plain folder."""


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[ModelCard]
