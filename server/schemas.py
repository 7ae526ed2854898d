"""OpenAI-compatible request bodies, decoded and validated with msgspec.

Nothing a client sends is silently ignored: a field outside the OpenAI API is a 400 naming it
(``forbid_unknown_fields``), and an OpenAI field this server does not implement (logprobs,
penalties, logprobs...) is declared here so the OpenAPI document lists it, and
is a 400 naming it whenever it asks for anything but the default behaviour.  Clients that
send the defaults explicitly (``"n": 1``, ``"presence_penalty": 0``) keep working.

The same Structs produce the OpenAPI request schemas (server/api_docs.py), so the document and
the validation cannot disagree.  Lengths are bounded here too; the body-size limit
(server.max_body_bytes) bounds the total.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from medserve.server.errors import APIError
from medserve.server.json_body import decode_json

MAX_MESSAGES = 512
MAX_CONTENT_PARTS = 64
MAX_TEXT_CHARS = 262_144
"""Per string (a message, a part, a prompt): more than any served context holds."""
MAX_NAME_CHARS = 256

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
# The engine samples in float32: a top_p below float32's range rounds to 0, which it refuses.
TopP = Annotated[float, msgspec.Meta(ge=1e-6, le=1.0)]
TopK = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
StopString = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
StopStrings = StopString | Annotated[list[StopString], msgspec.Meta(max_length=4)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Count = Annotated[int, msgspec.Meta(ge=1, le=128)]


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    """Only text: images, audio and files are not supported."""
    text: Text


FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class CalledFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: FunctionName
    arguments: Text
    """The arguments as JSON text, as the model wrote them."""


class ToolCall(msgspec.Struct, forbid_unknown_fields=True):
    """A call an assistant turn made (sent back in the history of a conversation)."""

    id: Name
    type: Literal["function"]
    function: CalledFunction


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | Annotated[list[TextPart], msgspec.Meta(max_length=MAX_CONTENT_PARTS)] | None = (
        None
    )
    name: Name | None = None
    tool_calls: Annotated[list[ToolCall], msgspec.Meta(max_length=64)] | None = None
    tool_call_id: Name | None = None
    """On a ``tool`` turn: the call whose result this is."""

    def text(self) -> str:
        if self.tool_calls and not self.content:
            # The model wrote calls as this JSON (server/structured_output.py): show it the same.
            return "\n".join(
                f'{{"name": "{c.function.name}", "arguments": {c.function.arguments}}}'
                for c in self.tool_calls
            )
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionSpec(msgspec.Struct, forbid_unknown_fields=True):
    name: FunctionName
    description: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    parameters: dict[str, Any] | None = None
    """JSON Schema of the arguments (checked like response_format schemas)."""
    strict: bool | None = None
    """Accepted; arguments are always constrained to ``parameters`` when a call is forced."""


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Name | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    """Extension (as in vLLM): sample from the k most likely tokens; 0 or absent = all."""
    seed: Seed | None = None
    stop: StopStrings | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None
    """Accepted for client compatibility; never logged (it may identify a person)."""
    # Declared but not implemented: anything but the default is a 400 naming the field.
    n: Count = 1
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling, kw_only=True, forbid_unknown_fields=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
    # Declared but not implemented (see _reject_unsupported).
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    """``none``, ``auto`` (the model may answer or call), ``required`` (a call is forced by
    constrained decoding), or ``{"type": "function", "function": {"name": ...}}``."""
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None


class CompletionRequest(_Sampling, kw_only=True, forbid_unknown_fields=True):
    prompt: Text | Annotated[list[Text], msgspec.Meta(min_length=1, max_length=1)]
    """One prompt per request (a list must hold exactly one)."""
    # Declared but not implemented (see _reject_unsupported).
    echo: bool = False
    suffix: Text | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    best_of: Count | None = None


T = TypeVar("T")


def decode_body(body: bytes, request_type: type[T]) -> T:
    """Decode and validate an OpenAI request body; unsupported options are a 400 too."""
    request = decode_json(body, request_type)
    _reject_unsupported(request)
    return request


def _reject_unsupported(request: Any) -> None:
    for param, asks_for_it, message in _unsupported(request):
        if asks_for_it:
            text = message if param in message else f"{param}: {message}"
            raise APIError(400, text, param=param, code="unsupported_parameter")


def _unsupported(request: Any) -> list[tuple[str, bool, str]]:
    checks = [
        ("n", request.n != 1, "only n=1 is supported"),
        (
            "frequency_penalty",
            bool(request.frequency_penalty),
            "frequency_penalty is not supported",
        ),
        ("presence_penalty", bool(request.presence_penalty), "presence_penalty is not supported"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
    ]
    if isinstance(request, ChatCompletionRequest):
        checks += [
            ("logprobs", bool(request.logprobs), "logprobs are not supported"),
            ("top_logprobs", bool(request.top_logprobs), "top_logprobs are not supported"),
            ("functions", bool(request.functions), "function calling is not supported"),
            (
                "function_call",
                request.function_call not in (None, "none", "auto"),
                "function calling is not supported",
            ),
            ("store", bool(request.store), "this server stores no completions (store=true)"),
            ("metadata", bool(request.metadata), "metadata is only used with store, which is off"),
            (
                "service_tier",
                request.service_tier not in (None, "auto", "default"),
                "service tiers are not supported",
            ),
            (
                "modalities",
                request.modalities is not None and set(request.modalities) != {"text"},
                "only the text modality is supported",
            ),
            ("audio", request.audio is not None, "audio output is not supported"),
            ("prediction", request.prediction is not None, "predicted outputs are not supported"),
            (
                "reasoning_effort",
                request.reasoning_effort is not None,
                "reasoning_effort is not supported",
            ),
            (
                "web_search_options",
                request.web_search_options is not None,
                "web search is not supported (no network access)",
            ),
        ]
    else:
        checks += [
            ("echo", request.echo, "echo is not supported"),
            ("suffix", bool(request.suffix), "suffix is not supported"),
            ("logprobs", bool(request.logprobs), "logprobs are not supported"),
            ("best_of", request.best_of not in (None, 1), "only best_of=1 is supported"),
        ]
    return checks
