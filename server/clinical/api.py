"""HTTP routes for HIS/EMR integrations: /v1/clinical/symptoms, /discharge-summary, /similar-cases.

Each handler reads top to bottom: decode and validate -> (similar cases: search the index) ->
one constrained generation (server/generation.py) -> parse and validate the answer against the
very schema decoding was held to -> shape the JSON.  An answer that does not validate is a 502
in the OpenAI error shape, never data.  Patient text never reaches a log line: the access log
records ids, token counts and timings, and these handlers log only counts on failure.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import structlog
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from litestar import Request, Router, post
from litestar.di import Provide
from medserve.accel.base import Turn
from medserve.server.api_docs import documented
from medserve.server.audit.context import audited, note_cases
from medserve.server.auth.scopes import CASES_READ, CHAT, route_scope
from medserve.server.cases.api import search_limits
from medserve.server.cases.component import CasesComponent
from medserve.server.cases.service import Match
from medserve.server.clinical.prompts import (
    discharge_prompt,
    language_of,
    similar_cases_prompt,
    symptoms_prompt,
)
from medserve.server.clinical.schemas import (
    DISCHARGE_SCHEMA,
    SYMPTOMS_SCHEMA,
    DischargeSummary,
    DischargeSummaryRequest,
    SimilarCasesRequest,
    SimilarCasesSummary,
    SymptomList,
    SymptomsRequest,
    similar_cases_schema,
)
from medserve.server.errors import APIError
from medserve.server.generation import (
    Generated,
    generate_text,
    require_structured_output,
    resolve_model,
)
from medserve.server.json_body import decode_json as decode
from medserve.server.metrics import Metrics
from medserve.server.state import ServerState

log = structlog.get_logger("medserve.clinical")

# Enough for the longest strings the schemas allow in Chinese (~2.3 tokens a character with the
# bundled model's tokenizer; 256 tokens cut a 300-character Chinese summary off).  An answer
# cut off by the limit does not validate and is refused (502): these bound latency only.
SYMPTOMS_MAX_TOKENS = 640
DISCHARGE_MAX_TOKENS = 1024
SIMILAR_MAX_TOKENS = 640


@post(
    "/clinical/symptoms",
    status_code=200,
    opt=route_scope(CHAT) | audited("clinical.symptoms"),
    operation_class=documented(SymptomsRequest, SymptomList),
)
async def extract_symptoms(request: Request[Any, Any, Any], runtime: ServerState) -> dict[str, Any]:
    """Symptoms in a complaint (English or Chinese), negated ones with present=false."""
    body = decode(await request.body(), SymptomsRequest)
    _check_not_blank(body.text, "text")
    model = _structured_model(runtime, body.model)
    answer, generated = await _structured(
        request,
        runtime,
        model,
        symptoms_prompt(body.text),
        SYMPTOMS_SCHEMA,
        max_tokens=SYMPTOMS_MAX_TOKENS,
        purpose="symptoms",
    )
    return {**answer, "model": generated.model, "usage": _usage(generated)}


@post(
    "/clinical/discharge-summary",
    status_code=200,
    opt=route_scope(CHAT) | audited("clinical.discharge_summary"),
    operation_class=documented(DischargeSummaryRequest, DischargeSummary),
)
async def discharge_summary(
    request: Request[Any, Any, Any], runtime: ServerState
) -> dict[str, Any]:
    """A discharge note rewritten for the patient: diagnoses, medications, follow-up, warnings."""
    body = decode(await request.body(), DischargeSummaryRequest)
    _check_not_blank(body.note, "note")
    model = _structured_model(runtime, body.model)
    language = body.language or language_of(body.note)
    answer, generated = await _structured(
        request,
        runtime,
        model,
        discharge_prompt(body.note, language),
        DISCHARGE_SCHEMA,
        max_tokens=DISCHARGE_MAX_TOKENS,
        purpose="discharge",
    )
    return {**answer, "language": language, "model": generated.model, "usage": _usage(generated)}


@post(
    "/clinical/similar-cases",
    status_code=200,
    # The middleware checks chat; the handler also demands cases:read (both are needed).
    opt=route_scope(CHAT) | audited("clinical.similar_cases"),
    operation_class=documented(SimilarCasesRequest, SimilarCasesSummary),
)
async def similar_cases(
    request: Request[Any, Any, Any], runtime: ServerState, cases: CasesComponent, metrics: Metrics
) -> dict[str, Any]:
    """What the most similar indexed cases have in common, citing only retrieved case ids."""
    _require_scope(request, CASES_READ)
    body = decode(await request.body(), SimilarCasesRequest)
    _check_not_blank(body.text, "text")
    limits = cases.settings
    if len(body.text) > limits.max_text_chars:
        raise APIError(
            400, f"text is longer than cases.max_text_chars ({limits.max_text_chars})", param="text"
        )
    filters = search_limits(body.k, body.filters, limits.max_k)
    model = _structured_model(runtime, body.model)
    service = cases.require_index()
    with metrics.time_case_search():
        matches = await service.search(k=body.k, text=body.text, filters=filters)
    note_cases(request, (m.record.case_id for m in matches))
    listed = [_case_json(m) for m in matches]
    if not matches:
        reason = "no indexed case matches these filters" if filters else "the case index is empty"
        return {
            "summary": None,
            "reason": reason,
            "cited_case_ids": [],
            "cases": [],
            "model": None,
            "usage": None,
        }
    ids = [m.record.case_id for m in matches]
    answer, generated = await _structured(
        request,
        runtime,
        model,
        similar_cases_prompt(body.text, [(m.record, m.score) for m in matches]),
        similar_cases_schema(ids),
        max_tokens=SIMILAR_MAX_TOKENS,
        purpose="similar",
    )
    return {
        "summary": answer["summary"],
        "reason": None,
        # Validated against the enum of ``ids``; repeats are dropped, the order kept.
        "cited_case_ids": list(dict.fromkeys(answer["cited_case_ids"])),
        "cases": listed,
        "model": generated.model,
        "usage": _usage(generated),
    }


def clinical_router(cases: CasesComponent | None) -> Router:
    """The clinical routes; similar-cases only with a case index."""
    handlers: list[Any] = [extract_symptoms, discharge_summary]
    dependencies: dict[str, Provide] = {}
    if cases is not None:
        handlers.append(similar_cases)
        dependencies["cases"] = Provide(lambda: cases, use_cache=True, sync_to_thread=False)
    return Router(path="/v1", route_handlers=handlers, dependencies=dependencies)


# -- helpers -----------------------------------------------------------------------------


def _structured_model(runtime: ServerState, requested: str | None) -> str:
    """The model to use, refused (404/400) before any work if it cannot follow a schema."""
    name = resolve_model(runtime, requested)
    require_structured_output(runtime, name, "model")
    return name


async def _structured(
    request: Request[Any, Any, Any],
    runtime: ServerState,
    model: str,
    messages: Sequence[Turn],
    schema: dict[str, Any],
    *,
    max_tokens: int,
    purpose: str,
) -> tuple[dict[str, Any], Generated]:
    generated = await generate_text(
        runtime,
        model,
        messages,
        max_tokens=max_tokens,
        temperature=0.0,
        json_schema=schema,
        purpose=purpose,
    )
    usage = request.scope.setdefault("state", {}).setdefault("usage", {})
    usage["model"] = generated.model
    usage["prompt_tokens"] = generated.prompt_tokens
    usage["completion_tokens"] = generated.completion_tokens
    usage["finish_reason"] = generated.finish_reason
    return _validated(generated, schema, purpose, usage), generated


def _validated(
    generated: Generated, schema: dict[str, Any], purpose: str, usage: dict[str, Any]
) -> dict[str, Any]:
    """The parsed answer if it satisfies ``schema``; otherwise a 502 (never partial data)."""
    problem: str | None = None
    try:
        value = json.loads(generated.text)
    except ValueError:
        problem = "is not valid JSON"
    else:
        error = best_match(Draft202012Validator(schema).iter_errors(value))
        if error is not None:
            # The path and the rule only: the error's message quotes the model's text.
            problem = f"breaks the schema at {error.json_path} ({error.validator})"
    if problem is None:
        return value  # type: ignore[no-any-return]
    truncated = generated.finish_reason == "length"
    usage["error"] = "output_truncated" if truncated else "invalid_model_output"
    log.warning(
        "clinical.invalid_output",
        purpose=purpose,
        model=generated.model,
        finish_reason=generated.finish_reason,
        completion_tokens=generated.completion_tokens,
    )
    if truncated:
        raise APIError(
            502,
            f"the model's answer was cut off at {generated.completion_tokens} tokens and {problem}",
            code="output_truncated",
        )
    raise APIError(502, f"the model's answer {problem}", code="invalid_model_output")


def _require_scope(request: Request[Any, Any, Any], scope: str) -> None:
    # The auth middleware always sets a principal here; without one, refuse (fail closed).
    principal = request.scope.get("state", {}).get("principal")
    if principal is None or scope not in principal.scopes:
        key = principal.key_id if principal is not None else "(none)"
        raise APIError(
            403,
            f"API key {key} lacks the scope this route also needs: {scope}",
            code="insufficient_scope",
        )


def _check_not_blank(text: str, param: str) -> None:
    if not text.strip():
        raise APIError(400, f"{param} is empty", param=param)


def _case_json(match: Match) -> dict[str, Any]:
    # Minimal fields: the caller already holds cases:read, but the summary is what it asked for.
    record = match.record
    return {
        "case_id": record.case_id,
        "score": round(match.score, 6),
        "department": record.department,
        "age": record.age,
        "sex": record.sex,
        "icd10": list(record.icd10),
    }


def _usage(generated: Generated) -> dict[str, int]:
    return {
        "prompt_tokens": generated.prompt_tokens,
        "completion_tokens": generated.completion_tokens,
        "total_tokens": generated.prompt_tokens + generated.completion_tokens,
    }
