"""One completion, start to finish, for the server's own routes (answers, clinical helpers).

The OpenAI routes stream chunks to the client; the clinical routes need the whole text (often
a JSON document constrained by a schema) before they can check and shape it.  Both go through
the same admission errors (``first_chunk``), so a full queue is a 503 and a too-long prompt a
400 whichever route asked.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from medserve.accel.base import (
    BackendError,
    BackendOverloaded,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    PromptTooLong,
    Sampling,
    Turn,
)
from medserve.server.errors import APIError
from medserve.server.state import ServerState


@dataclass(frozen=True)
class Generated:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    model: str
    version: str | None


def resolve_model(runtime: ServerState, requested: str | None) -> str:
    """The served model a request names (the default when it names none), or a 404."""
    if requested is None:
        return runtime.default_model
    backend = runtime.require_backend()
    if not backend.has_model(requested):
        served = ", ".join(m.name for m in backend.models())
        raise APIError(
            404,
            f"model {requested!r} does not exist; served models: {served}",
            param="model",
            code="model_not_found",
        )
    return requested


def model_info(runtime: ServerState, model: str) -> ModelInfo | None:
    """What the engine serving ``model`` said about it when it loaded."""
    return next((m for m in runtime.require_backend().models() if m.name == model), None)


def require_structured_output(runtime: ServerState, model: str, param: str) -> None:
    """400 unless the engine serving ``model`` can constrain decoding to a schema."""
    info = model_info(runtime, model)
    if info is not None and not info.structured_output:
        raise APIError(
            400,
            f"{param}: model {model!r} is served by the {info.backend} engine, which has no "
            "constrained decoding; serve it with the openvino engine for structured output",
            param=param,
            code="unsupported_parameter",
        )


async def first_chunk(chunks: AsyncIterator[GenerationChunk], deadline: float) -> GenerationChunk:
    """The first chunk, with admission failures turned into HTTP errors."""
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(chunks)
    except PromptTooLong as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except BackendOverloaded as exc:
        raise APIError(503, str(exc), code="overloaded") from None
    except BackendError as exc:
        raise APIError(503, f"inference backend unavailable: {exc}", code="backend_error") from None
    except TimeoutError:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise APIError(503, "generation timed out before the first token", code="timeout") from None


async def read_to_end(
    chunks: AsyncIterator[GenerationChunk], first: GenerationChunk, deadline: float
) -> tuple[str, GenerationChunk]:
    """All the text from ``first`` on, and the last chunk; the stream is closed either way.

    At the deadline the answer ends as "length" (cut, as for max_tokens) rather than failing.
    """
    parts = [first.text]
    last = first
    try:
        async with asyncio.timeout_at(deadline):
            while last.finish_reason is None:
                last = await anext(chunks)
                parts.append(last.text)
    except TimeoutError:
        last = GenerationChunk("", "length", last.num_prompt_tokens, last.num_completion_tokens)
    except BackendError as exc:
        raise APIError(503, f"generation failed: {exc}", code="backend_error") from None
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    return "".join(parts), last


async def generate_text(
    runtime: ServerState,
    model: str | None,
    messages: Sequence[Turn],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    json_schema: dict[str, Any] | None = None,
    purpose: str = "gen",
) -> Generated:
    """Run one chat completion to its end; ``json_schema`` constrains the output to it."""
    name = resolve_model(runtime, model)
    if json_schema is not None:
        require_structured_output(runtime, name, "response_format")
    backend = runtime.require_backend()
    version = next((m.version for m in backend.models() if m.name == name), None)
    request = GenerationRequest(
        request_id=f"{purpose}-{uuid.uuid4().hex}",
        model=name,
        params=Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            json_schema=None if json_schema is None else json.dumps(json_schema),
        ),
        messages=tuple(messages),
    )
    deadline = asyncio.get_running_loop().time() + runtime.request_timeout_s
    chunks = backend.generate(request)
    text, last = await read_to_end(chunks, await first_chunk(chunks, deadline), deadline)
    return Generated(
        text=text,
        finish_reason=last.finish_reason,
        prompt_tokens=last.num_prompt_tokens,
        completion_tokens=last.num_completion_tokens,
        model=name,
        version=version,
    )
