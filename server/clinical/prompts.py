"""The conversations sent to the model for each clinical helper.

Short system prompts with one worked example: the bundled model is tiny, and the JSON shape is
enforced by constrained decoding anyway -- the prompt only has to say what goes into it.
Patient text is always the user turn, never mixed into the instructions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from medserve.accel.base import Turn
from medserve.server.cases.store import CaseRecord

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")

CASE_TEXT_CHARS = 400
"""Of each retrieved case in the similar-cases prompt: k cases must fit the context."""

_SYMPTOMS_SYSTEM = (
    "Extract the symptoms from the patient's complaint. present is false when the symptom is "
    "denied or absent (no fever, 无发热, 否认胸痛). duration, severity (mild, moderate or severe) "
    "and body_site are null unless the text states them. Answer with JSON only."
)


def _symptom(
    name: str, present: bool, duration: str | None = None, **extra: str | None
) -> dict[str, object]:
    return {
        "name": name,
        "present": present,
        "duration": duration,
        "severity": extra.get("severity"),
        "body_site": extra.get("body_site"),
    }


# Worked examples as earlier turns of the conversation, one per language: measured with the
# bundled 135M model, an example inside the system prompt is copied verbatim (an English
# headache for a Chinese fever) and no example at all repeats one symptom until maxItems.
_SYMPTOMS_EXAMPLES = (
    (
        "Severe headache for 2 days, no fever.",
        [
            _symptom("headache", True, "2 days", severity="severe", body_site="head"),
            _symptom("fever", False),
        ],
    ),
    (
        "腹痛一天，无呕吐。",
        [_symptom("腹痛", True, "一天", body_site="腹部"), _symptom("呕吐", False)],
    ),
)

_DISCHARGE_SYSTEM = {
    "en": (
        "You rewrite a hospital discharge note for the patient, in plain English a patient "
        "understands, without jargon. Give a short summary of the stay, the diagnoses, each "
        "medication with how to take it, the follow-up appointments or tests, and the warning "
        "signs that mean the patient must come back or call for help. Only use facts from the "
        "note. Answer with JSON only."
    ),
    "zh": (
        "请把医院出院记录改写成患者能看懂的简体中文，避免专业术语。给出住院经过的简短总结、诊断、"
        "每种药物及服用方法、复诊或检查安排，以及需要立即返院或求助的危险信号。只使用记录中的信息。"
        "只用JSON回答。"
    ),
}

_SIMILAR_SYSTEM = (
    "You compare a patient case with similar past cases from the hospital's case index. "
    "In two or three sentences, say what the similar cases have in common with the new case "
    "(diagnoses, findings, treatment) and cite the ids of the cases you rely on. "
    "Answer with JSON only."
)


def language_of(text: str) -> str:
    """'zh' when Chinese characters make up a noticeable part of the text, else 'en'."""
    cjk = len(_CJK.findall(text))
    return "zh" if cjk and cjk * 5 >= len(text.strip()) else "en"


def symptoms_prompt(complaint: str) -> list[Turn]:
    turns = [Turn(role="system", content=_SYMPTOMS_SYSTEM)]
    for text, symptoms in _SYMPTOMS_EXAMPLES:
        turns.append(Turn(role="user", content=text))
        answer = json.dumps({"symptoms": symptoms}, ensure_ascii=False)
        turns.append(Turn(role="assistant", content=answer))
    return [*turns, Turn(role="user", content=complaint)]


# One short worked example per language, as an earlier turn (see _SYMPTOMS_EXAMPLES): without
# it the bundled model fills the lists with timestamps until max_tokens runs out.
_DISCHARGE_EXAMPLES = {
    "en": (
        "Admitted with a urinary tract infection. Treated with IV antibiotics. Discharged on "
        "nitrofurantoin 100 mg twice daily for 5 days. See GP in 1 week. Return if fever or "
        "back pain.",
        {
            "summary": "You were treated in hospital for an infection of the bladder.",
            "diagnoses": ["Urinary tract infection"],
            "medications": [
                {"name": "Nitrofurantoin 100 mg", "instructions": "Twice a day for 5 days"}
            ],
            "follow_up": ["See your GP in 1 week"],
            "warning_signs": ["Fever", "Back pain"],
        },
    ),
    "zh": (
        "因尿路感染入院，予静脉抗生素治疗。出院带药：呋喃妥因100毫克，每日2次，共5天。1周后门诊复查。"
        "如发热或腰痛请返院。",
        {
            "summary": "您因膀胱感染住院治疗，现已好转出院。",
            "diagnoses": ["尿路感染"],
            "medications": [{"name": "呋喃妥因100毫克", "instructions": "每日2次，共5天"}],
            "follow_up": ["1周后门诊复查"],
            "warning_signs": ["发热", "腰痛"],
        },
    ),
}


def discharge_prompt(note: str, language: str) -> list[Turn]:
    example_note, example = _DISCHARGE_EXAMPLES[language]
    return [
        Turn(role="system", content=_DISCHARGE_SYSTEM[language]),
        Turn(role="user", content=example_note),
        Turn(role="assistant", content=json.dumps(example, ensure_ascii=False)),
        Turn(role="user", content=note),
    ]


def similar_cases_prompt(query: str, cases: Sequence[tuple[CaseRecord, float]]) -> list[Turn]:
    listed = "\n".join(
        f"[{record.case_id}] (similarity {score:.2f}) {_clip(record.text)}"
        for record, score in cases
    )
    user = f"New case:\n{query}\n\nSimilar past cases:\n{listed}"
    return [Turn(role="system", content=_SIMILAR_SYSTEM), Turn(role="user", content=user)]


def _clip(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= CASE_TEXT_CHARS else flat[:CASE_TEXT_CHARS] + "..."
