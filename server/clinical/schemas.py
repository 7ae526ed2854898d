"""Bodies of the clinical helper routes, and the JSON Schemas the model's output is held to.

One definition per shape: the ``*Output`` Structs say what the model must write; their msgspec
JSON Schema, with references inlined (``output_schema``), is what the engine's constrained
decoding enforces and what the answer is validated against before anything is returned.  The
response Structs add ``model`` and ``usage`` and document the routes in the OpenAPI document.

Every string and list the model writes is bounded, tightly: a 135M-parameter model constrained
to JSON fills a free field until its bound (measured: an 800-character summary bound gave
1,000-token answers taking 80-340 s on two cores), and a truncated document is refused.
Request bodies reject unknown fields (a misspelt ``"langauge"`` must not be silently ignored).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from medserve.server.cases.schemas import FiltersIn

MAX_COMPLAINT_CHARS = 4_000
"""A chief complaint or triage note, not a whole record."""
MAX_NOTE_CHARS = 12_000
"""A discharge note; longer ones would not fit the bundled model's context anyway."""
MAX_CASE_QUERY_CHARS = 4_000
MAX_SIMILAR_K = 10

ModelName = Annotated[str, msgspec.Meta(max_length=256)]
Complaint = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_COMPLAINT_CHARS)]
Note = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NOTE_CHARS)]
CaseQuery = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CASE_QUERY_CHARS)]


# Bounded strings the model writes (the bound is the number of characters).
Short = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Diagnosis = Annotated[str, msgspec.Meta(min_length=1, max_length=80)]
Instruction = Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
Summary = Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
CasesSummary = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


# -- what the model writes ---------------------------------------------------------------


class SymptomOut(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    present: bool
    """False when the complaint negates it ('no fever', '无发热')."""
    duration: Short | None
    severity: Literal["mild", "moderate", "severe"] | None
    body_site: Short | None


class SymptomsOutput(msgspec.Struct, forbid_unknown_fields=True):
    symptoms: Annotated[list[SymptomOut], msgspec.Meta(max_length=8)]


class MedicationOut(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    instructions: Instruction


class DischargeOutput(msgspec.Struct, forbid_unknown_fields=True):
    summary: Summary
    diagnoses: Annotated[list[Diagnosis], msgspec.Meta(max_length=4)]
    medications: Annotated[list[MedicationOut], msgspec.Meta(max_length=6)]
    follow_up: Annotated[list[Instruction], msgspec.Meta(max_length=4)]
    warning_signs: Annotated[list[Instruction], msgspec.Meta(max_length=4)]


class SimilarCasesOutput(msgspec.Struct, forbid_unknown_fields=True):
    summary: CasesSummary
    cited_case_ids: list[str]
    """Constrained per request to an enum of the retrieved ids (``similar_cases_schema``)."""


def output_schema(struct: type) -> dict[str, Any]:
    """msgspec's JSON Schema of ``struct`` with every ``$ref`` inlined.

    Grammar compilers for constrained decoding handle plain nested schemas best, and the
    per-request enum of case ids must be written into the one place it applies.
    """
    document = msgspec.json.schema(struct)
    defs = document.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(document)


SYMPTOMS_SCHEMA = output_schema(SymptomsOutput)
DISCHARGE_SCHEMA = output_schema(DischargeOutput)


def similar_cases_schema(case_ids: list[str]) -> dict[str, Any]:
    """The summary schema with ``cited_case_ids`` limited to the ids actually retrieved."""
    schema = output_schema(SimilarCasesOutput)
    schema["properties"]["cited_case_ids"] = {
        "type": "array",
        "items": {"enum": list(case_ids)},
        "maxItems": len(case_ids),
    }
    return schema


# -- requests ----------------------------------------------------------------------------


class SymptomsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Complaint
    """The complaint in the patient's or clinician's words, English or Chinese."""
    model: ModelName | None = None


class DischargeSummaryRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    note: Note
    """The discharge note as written by the ward."""
    language: Literal["en", "zh"] | None = None
    """Language of the summary; None: the language of the note."""
    model: ModelName | None = None


class SimilarCasesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: CaseQuery
    """The case to compare, as free text."""
    k: Annotated[int, msgspec.Meta(ge=1, le=MAX_SIMILAR_K)] = 5
    filters: FiltersIn | None = None
    """As in /v1/cases/search."""
    model: ModelName | None = None


# -- responses ---------------------------------------------------------------------------


class ClinicalUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SymptomList(SymptomsOutput):
    model: str
    usage: ClinicalUsage


class DischargeSummary(DischargeOutput):
    language: Literal["en", "zh"]
    model: str
    usage: ClinicalUsage


class SimilarCase(msgspec.Struct):
    case_id: str
    score: float
    department: str | None
    age: int | None
    sex: Literal["female", "male", "other", "unknown"] | None
    icd10: list[str]


class SimilarCasesSummary(msgspec.Struct):
    summary: str | None
    """None when no case matched (then ``reason`` says so and no model ran)."""
    reason: str | None
    cited_case_ids: list[str]
    """Only ids from ``cases``: the model's choice is constrained to them."""
    cases: list[SimilarCase]
    model: str | None
    usage: ClinicalUsage | None
