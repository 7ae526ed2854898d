"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

The path of a request reads top to bottom: decode and validate the body -> build a
GenerationRequest -> ask the backend for the first chunk (so admission errors become proper
HTTP statuses before any byte is sent) -> return JSON or stream SSE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.response import Stream
from medserve.accel.base import (
    BackendError,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    Sampling,
)
from medserve.server.api_docs import documented
from medserve.server.audit.context import audited
from medserve.server.auth.scopes import CHAT, EMBEDDINGS, route_scope
from medserve.server.errors import APIError
from medserve.server.generation import (
    first_chunk,
    model_info,
    read_to_end,
    require_structured_output,
    resolve_model,
)
from medserve.server.metrics import Metrics
from medserve.server.openai_shapes import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ModelCard,
    ModelList,
    ResponseBuilder,
)
from medserve.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    decode_body,
)
from medserve.server.state import ServerState
from medserve.server.structured_output import (
    check_tools,
    response_schema,
    template_tool,
    tool_call_schema,
    tools_instruction,
)
from medserve.server.tool_calls import ToolCalls, chat_turns, with_system_note


@get("/models", opt=route_scope(CHAT, EMBEDDINGS), operation_class=documented(None, ModelList))
async def list_models(runtime: ServerState) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [_model_card(m) for m in (runtime.backend.models() if runtime.backend else [])],
    }


@get(
    "/models/{model_id:str}",
    opt=route_scope(CHAT, EMBEDDINGS),
    operation_class=documented(None, ModelCard),
)
async def get_model(runtime: ServerState, model_id: str) -> dict[str, Any]:
    for m in runtime.require_backend().models():
        if m.name == model_id:
            return _model_card(m)
    raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")


def _model_card(m: ModelInfo) -> dict[str, Any]:
    # "version": which installed version serves (None for a plain folder); an extra field
    # the OpenAI clients ignore.
    return {
        "id": m.name,
        "object": "model",
        "created": m.created,
        "owned_by": "medserve",
        "version": m.version,
    }


@post(
    "/chat/completions",
    status_code=200,
    opt=route_scope(CHAT) | audited("chat.create"),
    operation_class=documented(ChatCompletionRequest, ChatCompletion, stream=ChatCompletionChunk),
)
async def chat_completions(
    request: Request[Any, Any, Any], runtime: ServerState, metrics: Metrics
) -> Response[Any]:
    body = decode_body(await request.body(), ChatCompletionRequest)
    model = resolve_model(runtime, body.model)
    info = model_info(runtime, model)
    # GLM-4-9B-chat / ChatGLM3: the model's own template describes the tools and writes calls
    # in the syntax it was trained on; every other model gets a generic note and JSON calls.
    template_tools = info is not None and info.template_tools
    turns = chat_turns(body.messages, template_tools)
    schema = response_schema(body.response_format)
    tools = body.tools if body.tools and body.tool_choice != "none" else []
    calls: ToolCalls | None = None
    if tools:
        check_tools(tools)
        if not template_tools:
            turns = with_system_note(turns, tools_instruction(tools))
        forced = body.tool_choice == "required" or isinstance(body.tool_choice, dict)
        if forced and schema is not None:
            raise APIError(
                400,
                "response_format cannot be combined with a forced tool_choice",
                param="response_format",
            )
        if forced:
            schema = tool_call_schema(tools, body.tool_choice)
        calls = ToolCalls(tools, forced, template_syntax=template_tools)
    if schema is not None:
        require_structured_output(runtime, model, "tool_choice" if calls else "response_format")
    generation = GenerationRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        model=model,
        params=msgspec.structs.replace(
            _sampling(runtime, body),
            json_schema=None if schema is None else json.dumps(schema),
        ),
        messages=tuple(turns),
        tools=tuple(template_tool(t) for t in tools) if template_tools else (),
    )
    return await _respond(
        request,
        runtime,
        metrics,
        generation,
        body.stream,
        _include_usage(body),
        chat=True,
        calls=calls,
    )


@post(
    "/completions",
    status_code=200,
    opt=route_scope(CHAT) | audited("completion.create"),
    operation_class=documented(CompletionRequest, Completion, stream=Completion),
)
async def completions(
    request: Request[Any, Any, Any], runtime: ServerState, metrics: Metrics
) -> Response[Any]:
    body = decode_body(await request.body(), CompletionRequest)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]  # schema: 1 item
    generation = GenerationRequest(
        request_id=f"cmpl-{uuid.uuid4().hex}",
        model=resolve_model(runtime, body.model),
        params=_sampling(runtime, body),
        prompt=prompt,
    )
    return await _respond(
        request, runtime, metrics, generation, body.stream, _include_usage(body), chat=False
    )


def _sampling(runtime: ServerState, body: ChatCompletionRequest | CompletionRequest) -> Sampling:
    max_tokens = body.max_completion_tokens or body.max_tokens or runtime.default_max_tokens
    return Sampling(
        max_tokens=max_tokens,
        temperature=_temperature(body.temperature),
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        stop=body.stop_strings(),
    )


def _temperature(requested: float | None) -> float:
    if requested is None:
        return 1.0
    # Below 1e-3 sampling is greedy in all but name, and float32 (the engine's) rounds the
    # smallest values to 0 anyway: decode greedily rather than divide by ~0.
    return 0.0 if requested < _GREEDY_BELOW else requested


_GREEDY_BELOW = 1e-3


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _respond(
    request: Request[Any, Any, Any],
    runtime: ServerState,
    metrics: Metrics,
    generation: GenerationRequest,
    stream: bool,
    include_usage: bool,
    *,
    chat: bool,
    calls: ToolCalls | None = None,
) -> Response[Any]:
    usage = request.scope.setdefault("state", {}).setdefault("usage", {})
    usage["model"] = generation.model
    # One deadline for the whole request, first token included.
    deadline = asyncio.get_running_loop().time() + runtime.request_timeout_s
    backend = runtime.require_backend()
    # Read with no await before generate(): the version of the worker the request is bound
    # to, even if a reload switches the model while it runs.
    fingerprint = next((m.version for m in backend.models() if m.name == generation.model), None)
    chunks = metrics.observe_generation(generation.model, backend.generate(generation))
    first = await first_chunk(chunks, deadline)
    builder = ResponseBuilder(
        generation, chat=chat, created=int(time.time()), fingerprint=fingerprint, calls=calls
    )
    if not stream:
        return Response(
            await _unless_disconnected(request, _collect(chunks, first, builder, usage, deadline)),
            status_code=200,
        )
    if calls is not None:
        # A call is only known once its JSON is complete: tool requests stream as one event.
        chunks = _whole(chunks, first, deadline)
        first = await anext(chunks)
    return Stream(
        _sse(chunks, first, builder, usage, include_usage, deadline),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        status_code=200,
    )


async def _unless_disconnected(request: Request[Any, Any, Any], work: Any) -> Any:
    """Run ``work``; cancel it if the client hangs up first (an EMR call that timed out).

    Cancelling closes the backend stream, which aborts generation and frees its KV blocks,
    instead of computing a long answer nobody will read.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        request.scope.setdefault("state", {}).setdefault("usage", {})["error"] = "disconnected"
        raise APIError(499, "client disconnected", code="client_disconnected")
    return task.result()


async def _wait_for_disconnect(request: Request[Any, Any, Any]) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(
    chunks: AsyncIterator[GenerationChunk],
    first: GenerationChunk,
    builder: ResponseBuilder,
    usage: dict[str, Any],
    deadline: float,
) -> dict[str, Any]:
    text, last = await read_to_end(chunks, first, deadline)
    _record_usage(usage, last)
    return builder.full(text, last)


async def _whole(
    chunks: AsyncIterator[GenerationChunk], first: GenerationChunk, deadline: float
) -> AsyncIterator[GenerationChunk]:
    """The whole generation as one chunk (the stream is closed either way)."""
    text, last = await read_to_end(chunks, first, deadline)
    yield GenerationChunk(
        text, last.finish_reason, last.num_prompt_tokens, last.num_completion_tokens
    )


async def _sse(
    chunks: AsyncIterator[GenerationChunk],
    first: GenerationChunk,
    builder: ResponseBuilder,
    usage: dict[str, Any],
    include_usage: bool,
    deadline: float,
) -> AsyncIterator[bytes]:
    # aclosing: when the client disconnects, Litestar cancels this generator; closing the
    # backend stream then sends the abort that frees the request's KV blocks.
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        if builder.chat:
            yield _event(builder.delta_event(role=True))
        chunk = first
        finish_reason: str | None = None
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    if chunk.text:
                        event, finish_reason = builder.content_event(chunk.text)
                        yield event
                    if chunk.finish_reason is not None:
                        break
                    chunk = await anext(chunks)
        except TimeoutError:
            chunk = GenerationChunk(
                "", "length", chunk.num_prompt_tokens, chunk.num_completion_tokens
            )
        except BackendError as exc:
            usage["error"] = "backend_error"
            yield _event(
                {
                    "error": {
                        "message": f"generation failed: {exc}",
                        "type": "server_error",
                        "param": None,
                        "code": "backend_error",
                    }
                }
            )
            yield b"data: [DONE]\n\n"
            return
        _record_usage(usage, chunk)
        yield _event(builder.delta_event(finish_reason=finish_reason or chunk.finish_reason))
        if include_usage:
            yield _event(builder.usage_event(chunk))
        yield b"data: [DONE]\n\n"


def _record_usage(usage: dict[str, Any], last: GenerationChunk) -> None:
    usage["prompt_tokens"] = last.num_prompt_tokens
    usage["completion_tokens"] = last.num_completion_tokens
    usage["finish_reason"] = last.finish_reason


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


openai_router = Router(
    path="/v1", route_handlers=[list_models, get_model, chat_completions, completions]
)
