"""Request bodies (msgspec, unknown fields rejected) and documented response shapes."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from medserve.server.cases.languages import Scoring

Short = Annotated[str, msgspec.Meta(max_length=512)]


class DocumentIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    text: str
    format: Literal["text", "markdown", "pdf_base64"] = "text"
    source: Short | None = None
    language: Annotated[str, msgspec.Meta(max_length=32)] | None = None


class CreateDocuments(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One document (title, text, ...) or several under ``documents``."""

    title: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | None = None
    text: str | None = None
    format: Literal["text", "markdown", "pdf_base64"] = "text"
    source: Short | None = None
    language: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    documents: Annotated[list[DocumentIn], msgspec.Meta(min_length=1, max_length=64)] | None = None


class AnswerRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    question: Annotated[str, msgspec.Meta(min_length=1)]
    model: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1, le=20)] = 4
    min_score: Annotated[float, msgspec.Meta(ge=-1.0, le=1.0)] | None = None
    """The score the best passage needs, else the answer is refused; default
    ``knowledge.min_score`` or, on the language-centred scale, ``min_score_centred``."""
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=4096)] | None = None


class DocumentSummary(msgspec.Struct):
    id: str
    object: Literal["document"]
    title: str
    source: str | None
    language: str | None
    format: str
    chunks: int
    created_at: int


class DocumentOut(DocumentSummary):
    text: str


class DocumentList(msgspec.Struct):
    object: Literal["list"]
    data: list[DocumentSummary]


class DocumentDeleted(msgspec.Struct):
    id: str
    object: Literal["document.deleted"]
    deleted: bool


class Citation(msgspec.Struct):
    index: int
    document_id: str
    title: str
    chunk: int
    start: int
    end: int
    score: float
    cited_by_model: bool


class PassageOut(msgspec.Struct):
    index: int
    document_id: str
    chunk: int
    start: int
    end: int
    text: str
    score: float


class AnswerUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AnswerOut(msgspec.Struct):
    answer: str | None
    refused: bool
    citations: list[Citation]
    passages: list[PassageOut]
    id: str | None = None
    object: Literal["answer"] | None = None
    model: str | None = None
    reason: str | None = None
    usage: AnswerUsage | None = None
    scoring: Scoring | None = None
    """What the scores are: plain cosine, or language-centred cosine once Chinese and English
    passages are both stored (another scale, with its own default threshold)."""
    min_score: float | None = None
    """The score the best passage needed for an answer."""
    context_min_score: float | None = None
    """The score any further passage needed to be used with it."""
