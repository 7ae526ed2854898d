"""HTTP routes: /v1/documents (ingest, list, read, delete) and /v1/answers (cited answers).

Document, question and answer text never reach a log line: handlers log nothing themselves
and the service logs ids, counts and scores only.
"""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from typing import Any

import structlog
from litestar import Request, Router, delete, get, post
from litestar.di import Provide
from medserve.server.api_docs import documented
from medserve.server.audit.context import audited
from medserve.server.auth.scopes import CASES_READ, CASES_WRITE, CHAT, route_scope
from medserve.server.cases.languages import Scoring
from medserve.server.errors import APIError
from medserve.server.generation import generate_text
from medserve.server.json_body import decode_json as decode
from medserve.server.knowledge.answering import build_messages, cited_indexes
from medserve.server.knowledge.component import KnowledgeComponent
from medserve.server.knowledge.schemas import (
    AnswerOut,
    AnswerRequest,
    CreateDocuments,
    DocumentDeleted,
    DocumentIn,
    DocumentList,
    DocumentOut,
)
from medserve.server.knowledge.store import Document
from medserve.server.settings import KnowledgeSettings
from medserve.server.state import ServerState

log = structlog.get_logger("medserve.knowledge")

REFUSAL = "no passage in the knowledge base is relevant enough"


@post(
    "/documents",
    status_code=200,
    opt=route_scope(CASES_WRITE) | audited("document.write"),
    operation_class=documented(CreateDocuments, DocumentList),
)
async def create_documents(
    request: Request[Any, Any, Any], knowledge: KnowledgeComponent
) -> dict[str, Any]:
    """Stores documents, split into cited passages; 200 once all are durably stored."""
    body = decode(await request.body(), CreateDocuments)
    items = _items(body)
    limit = knowledge.settings.max_text_chars
    prepared = [(d, _document_text(d, i, len(items) > 1, limit)) for i, d in enumerate(items)]
    service = knowledge.require()
    stored = [
        await service.add(
            title=d.title, text=text, fmt=d.format, source=d.source, language=d.language
        )
        for d, text in prepared
    ]
    return {"object": "list", "data": [_summary(doc) for doc in stored]}


@get(
    "/documents",
    opt=route_scope(CASES_READ) | audited("document.list"),
    operation_class=documented(None, DocumentList),
)
async def list_documents(knowledge: KnowledgeComponent) -> dict[str, Any]:
    docs = await knowledge.require().list()
    return {"object": "list", "data": [_summary(d) for d in docs]}


@get(
    "/documents/{document_id:str}",
    opt=route_scope(CASES_READ) | audited("document.read"),
    operation_class=documented(None, DocumentOut),
)
async def get_document(document_id: str, knowledge: KnowledgeComponent) -> dict[str, Any]:
    doc = await knowledge.require().get(document_id)
    if doc is None:
        raise _not_found(document_id)
    return {**_summary(doc), "text": doc.text}


@delete(
    "/documents/{document_id:str}",
    status_code=200,
    opt=route_scope(CASES_WRITE) | audited("document.delete"),
    operation_class=documented(None, DocumentDeleted),
)
async def delete_document(document_id: str, knowledge: KnowledgeComponent) -> dict[str, Any]:
    if not await knowledge.require().delete(document_id):
        raise _not_found(document_id)
    return {"id": document_id, "object": "document.deleted", "deleted": True}


def _thresholds(
    settings: KnowledgeSettings, scoring: Scoring, requested: float | None
) -> tuple[float, float]:
    """(score the best passage needs for an answer, score any passage needs to join it).

    On the plain-cosine scale both are ``min_score``.  On the language-centred scale the
    other-language passage on the question's topic often ranks second well below the answer
    threshold (0.10-0.15 on the evaluation set), so passages after the best join down to the
    lower ``context_min_score_centred`` (RESULTS.md#refusal-threshold)."""
    if scoring == "language_centred":
        threshold = settings.min_score_centred if requested is None else requested
        return threshold, min(threshold, settings.context_min_score_centred)
    threshold = settings.min_score if requested is None else requested
    return threshold, threshold


@post(
    "/answers",
    status_code=200,
    opt=route_scope(CHAT) | audited("answer.create"),
    operation_class=documented(AnswerRequest, AnswerOut),
)
async def create_answer(
    request: Request[Any, Any, Any], knowledge: KnowledgeComponent, runtime: ServerState
) -> dict[str, Any]:
    """Answers from the knowledge base with numbered citations, or refuses without the model."""
    body = decode(await request.body(), AnswerRequest)
    settings = knowledge.settings
    if not body.question.strip():
        raise APIError(400, "question is empty", param="question")
    if len(body.question) > settings.max_question_chars:
        raise APIError(
            400,
            f"question is longer than {settings.max_question_chars} characters",
            param="question",
        )
    service = knowledge.require()
    retrieved = await service.search(body.question, body.top_k)
    found = retrieved.passages
    threshold, floor = _thresholds(settings, retrieved.scoring, body.min_score)
    answerable = bool(found) and found[0].score >= threshold
    used = [s for s in found if s.score >= floor] if answerable else []
    log.info(
        "knowledge.answer_search",
        found=len(found),
        used=len(used),
        best=round(found[0].score, 4) if found else None,
        threshold=threshold,
        scoring=retrieved.scoring,
    )
    if not used:
        return {
            "answer": None,
            "refused": True,
            "reason": REFUSAL,
            "scoring": retrieved.scoring,
            "min_score": threshold,
            "context_min_score": floor,
            "citations": [],
            "passages": [],
        }
    generated = await generate_text(
        runtime,
        body.model,
        build_messages(body.question, used),
        max_tokens=body.max_tokens or settings.default_max_tokens,
        temperature=0.0,
        purpose="answer",
    )
    cited = cited_indexes(generated.text, len(used))
    by_model = bool(cited)
    refs = cited or list(range(1, len(used) + 1))
    usage = request.scope.setdefault("state", {}).setdefault("usage", {})
    usage.update(
        model=generated.model,
        prompt_tokens=generated.prompt_tokens,
        completion_tokens=generated.completion_tokens,
    )
    return {
        "id": f"answer-{uuid.uuid4().hex}",
        "object": "answer",
        "model": generated.model,
        "answer": generated.text,
        "refused": False,
        "scoring": retrieved.scoring,
        "min_score": threshold,
        "context_min_score": floor,
        "citations": [
            {
                "index": n,
                "document_id": used[n - 1].passage.document_id,
                "title": used[n - 1].passage.title,
                "chunk": used[n - 1].passage.chunk,
                "start": used[n - 1].passage.start,
                "end": used[n - 1].passage.end,
                "score": round(used[n - 1].score, 6),
                "cited_by_model": by_model,
            }
            for n in refs
        ],
        "passages": [
            {
                "index": i,
                "document_id": s.passage.document_id,
                "chunk": s.passage.chunk,
                "start": s.passage.start,
                "end": s.passage.end,
                "text": s.passage.text,
                "score": round(s.score, 6),
            }
            for i, s in enumerate(used, start=1)
        ],
        "usage": {
            "prompt_tokens": generated.prompt_tokens,
            "completion_tokens": generated.completion_tokens,
            "total_tokens": generated.prompt_tokens + generated.completion_tokens,
        },
    }


def knowledge_router(component: KnowledgeComponent) -> Router:
    return Router(
        path="/v1",
        route_handlers=[
            create_documents,
            list_documents,
            get_document,
            delete_document,
            create_answer,
        ],
        dependencies={
            "knowledge": Provide(lambda: component, use_cache=True, sync_to_thread=False)
        },
    )


def _items(body: CreateDocuments) -> list[DocumentIn]:
    if body.documents is not None:
        if body.title is not None or body.text is not None:
            raise APIError(400, "send either 'documents' or one title and text", param="documents")
        return body.documents
    if body.title is None or body.text is None:
        raise APIError(
            400, "title and text are required", param="title" if body.title is None else "text"
        )
    return [
        DocumentIn(
            title=body.title,
            text=body.text,
            format=body.format,
            source=body.source,
            language=body.language,
        )
    ]


def _document_text(doc: DocumentIn, i: int, many: bool, limit: int) -> str:
    """The text to store: as sent, or extracted from the PDF; 400 when there is none."""
    param = f"documents[{i}].text" if many else "text"
    text = _pdf_text(doc.text, param) if doc.format == "pdf_base64" else doc.text
    if not text.strip():
        raise APIError(400, f"{param} is empty (no extractable text)", param=param)
    if len(text) > limit:
        raise APIError(
            400, f"{param} has {len(text)} characters; the limit is {limit}", param=param
        )
    return text


def _pdf_text(data: str, param: str) -> str:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} is not valid base64", param=param) from None
    if not raw.startswith(b"%PDF-"):
        raise APIError(400, f"{param} is not a PDF file", param=param)
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(raw))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError):
        raise APIError(400, f"{param}: the PDF cannot be read", param=param) from None
    return "\n\n".join(p.strip() for p in pages if p.strip())


def _summary(doc: Document) -> dict[str, Any]:
    return {
        "id": doc.id,
        "object": "document",
        "title": doc.title,
        "source": doc.source,
        "language": doc.language,
        "format": doc.format,
        "chunks": doc.chunks,
        "created_at": doc.created_at,
    }


def _not_found(document_id: str) -> APIError:
    return APIError(404, f"document {document_id!r} does not exist", code="document_not_found")
