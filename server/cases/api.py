"""HTTP routes: /v1/cases (batch upsert), /v1/cases/{id}, /v1/cases/search, /v1/embeddings.

Each handler reads top to bottom: decode and validate -> check limits -> call the service ->
shape the JSON.  Case text never reaches a log line: the access log records metadata only and
these handlers log nothing themselves.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from litestar import Request, Router, delete, get, post
from litestar.di import Provide
from medserve.server.api_docs import documented
from medserve.server.audit.context import audited, note_cases
from medserve.server.auth.scopes import CASES_READ, CASES_WRITE, EMBEDDINGS, route_scope
from medserve.server.cases.component import CasesComponent
from medserve.server.cases.filters import Filters
from medserve.server.cases.schemas import (
    CaseDeleted,
    CaseIn,
    CaseMatchList,
    CaseOut,
    CaseWrittenList,
    CreateCases,
    EmbeddingList,
    EmbeddingsRequest,
    SearchCases,
    case_json,
)
from medserve.server.cases.service import CaseNotFound
from medserve.server.errors import APIError
from medserve.server.json_body import decode_json as decode
from medserve.server.metrics import Metrics

_EMBEDDING_MODEL_ALIASES = ("e5-query", "e5-passage")


@post(
    "/cases",
    status_code=200,
    opt=route_scope(CASES_WRITE) | audited("case.write"),
    operation_class=documented(CreateCases, CaseWrittenList),
)
async def create_cases(request: Request[Any, Any, Any], cases: CasesComponent) -> dict[str, Any]:
    """Creates or replaces (by id) a batch of cases; 200 once all are durably stored."""
    body = decode(await request.body(), CreateCases)
    limits = cases.settings
    if len(body.cases) > limits.max_batch:
        raise APIError(
            400,
            f"at most {limits.max_batch} cases per request, got {len(body.cases)}",
            param="cases",
            code="batch_too_large",
        )
    _validate_cases(body.cases, limits.max_text_chars)
    note_cases(request, (c.id for c in body.cases))
    service = cases.require_index()
    written = await service.upsert([c.record() for c in body.cases])
    return {
        "object": "list",
        "data": [
            {"id": c.id, "object": "case", "status": "created" if w.created else "updated"}
            for c, w in zip(body.cases, written, strict=True)
        ],
    }


@get(
    "/cases/{case_id:str}",
    opt=route_scope(CASES_READ) | audited("case.read"),
    operation_class=documented(None, CaseOut),
)
async def get_case(case_id: str, cases: CasesComponent) -> dict[str, Any]:
    record = await cases.require_index().get(case_id)
    if record is None:
        raise _not_found(case_id)
    return case_json(record)


@delete(
    "/cases/{case_id:str}",
    status_code=200,
    opt=route_scope(CASES_WRITE) | audited("case.delete"),
    operation_class=documented(None, CaseDeleted),
)
async def delete_case(case_id: str, cases: CasesComponent) -> dict[str, Any]:
    if not await cases.require_index().delete(case_id):
        raise _not_found(case_id)
    return {"id": case_id, "object": "case.deleted", "deleted": True}


@post(
    "/cases/search",
    status_code=200,
    opt=route_scope(CASES_READ) | audited("case.search"),
    operation_class=documented(SearchCases, CaseMatchList),
)
async def search_cases(
    request: Request[Any, Any, Any], cases: CasesComponent, metrics: Metrics
) -> dict[str, Any]:
    """Most similar cases to a text or to a stored case, within optional filters."""
    body = decode(await request.body(), SearchCases)
    limits = cases.settings
    if (body.text is None) == (body.case_id is None):
        raise APIError(400, "send exactly one of 'text' or 'case_id'", param="text")
    if body.text is not None:
        _check_text(body.text, limits.max_text_chars, "text")
    filters = search_limits(body.k, body.filters, limits.max_k)
    if body.case_id is not None:
        note_cases(request, [body.case_id])
    service = cases.require_index()
    try:
        with metrics.time_case_search():
            matches = await service.search(
                k=body.k, text=body.text, case_id=body.case_id, filters=filters
            )
    except CaseNotFound:
        raise _not_found(body.case_id or "", param="case_id") from None
    note_cases(request, (m.record.case_id for m in matches))
    return {
        "object": "list",
        "scoring": service.scoring(),
        "data": [
            {"object": "case.match", "score": round(m.score, 6), "case": case_json(m.record)}
            for m in matches
        ],
    }


@post(
    "/embeddings",
    status_code=200,
    opt=route_scope(EMBEDDINGS) | audited("embeddings.create"),
    operation_class=documented(EmbeddingsRequest, EmbeddingList),
)
async def embeddings(request: Request[Any, Any, Any], cases: CasesComponent) -> dict[str, Any]:
    """OpenAI-compatible embeddings from the bundled multilingual e5 model."""
    body = decode(await request.body(), EmbeddingsRequest)
    service = cases.require_embedder()
    embedder = service.embedder
    if body.model is not None and body.model not in (embedder.name, *_EMBEDDING_MODEL_ALIASES):
        raise APIError(
            404,
            f"model {body.model!r} does not exist; embedding model: {embedder.name}",
            param="model",
            code="model_not_found",
        )
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise APIError(
            400, f"dimensions must be {embedder.dim} for {embedder.name}", param="dimensions"
        )
    texts = [body.input] if isinstance(body.input, str) else body.input
    limits = cases.settings
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if len(texts) > limits.max_batch:
        raise APIError(400, f"at most {limits.max_batch} inputs per request", param="input")
    for i, text in enumerate(texts):
        _check_text(text, limits.max_text_chars, f"input[{i}]" if len(texts) > 1 else "input")

    as_query = body.input_type == "query" or body.model == "e5-query"
    if body.model == "e5-passage":
        as_query = False
    vectors = await (service.embed_queries(texts) if as_query else service.embed_passages(texts))
    tokens = await service.count_tokens(texts)
    usage = request.scope.setdefault("state", {}).setdefault("usage", {})
    usage["model"] = embedder.name
    usage["prompt_tokens"] = tokens
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": embedder.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def cases_router(component: CasesComponent) -> Router:
    return Router(
        path="/v1",
        route_handlers=[create_cases, search_cases, get_case, delete_case, embeddings],
        dependencies={"cases": Provide(lambda: component, use_cache=True, sync_to_thread=False)},
    )


def _validate_cases(items: list[CaseIn], max_chars: int) -> None:
    seen: set[str] = set()
    for i, case in enumerate(items):
        if case.id == "search":
            # GET /v1/cases/search would hit the search route, not this case.
            raise APIError(
                400, "'search' is reserved and cannot be a case id", param=f"cases[{i}].id"
            )
        if case.id in seen:
            raise APIError(400, "case id appears twice in this batch", param=f"cases[{i}].id")
        seen.add(case.id)
        _check_text(case.text, max_chars, f"cases[{i}].text")
        if (
            case.admission_date is not None
            and case.discharge_date is not None
            and case.discharge_date < case.admission_date
        ):
            raise APIError(
                400, "discharge_date is before admission_date", param=f"cases[{i}].discharge_date"
            )


def search_limits(k: int, body_filters: Any, max_k: int) -> Filters | None:
    """The search's filters once ``k`` and the filters are within bounds (else a 400).

    Shared by every route that searches the case index (/v1/cases/search, clinical helpers).
    """
    if k > max_k:
        raise APIError(400, f"k must be <= {max_k}, got {k}", param="k")
    filters = body_filters.filters() if body_filters else None
    if (
        filters is not None
        and filters.age_min is not None
        and filters.age_max is not None
        and filters.age_min > filters.age_max
    ):
        raise APIError(400, "filters.age_min is above filters.age_max", param="filters.age_min")
    return filters


def _check_text(text: str, max_chars: int, param: str) -> None:
    if not text.strip():
        raise APIError(400, f"{param} is empty", param=param)
    if len(text) > max_chars:
        raise APIError(
            400, f"{param} has {len(text)} characters; the limit is {max_chars}", param=param
        )


def _not_found(case_id: str, param: str | None = None) -> APIError:
    # The id is echoed to the caller who sent it; it is not logged.
    return APIError(404, f"case {case_id!r} does not exist", param=param, code="case_not_found")


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # What the OpenAI client decodes: little-endian float32 bytes, base64.
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
