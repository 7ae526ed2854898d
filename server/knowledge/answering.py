"""The grounded-answer prompt and the citations read back from the model's [n] markers."""

from __future__ import annotations

import re
from collections.abc import Sequence

from medserve.accel.base import Turn
from medserve.server.knowledge.service import Scored

_MARKER = re.compile(r"\[(\d{1,2})\]")
_CJK = re.compile(r"[\u4e00-\u9fff]")

SYSTEM = (
    "You answer questions for hospital staff using ONLY the numbered passages below. "
    "Cite every statement with the passage number in square brackets, e.g. [1] or [2]. "
    "If the passages do not contain the answer, say so. Answer in {language}."
)


def question_language(question: str) -> str:
    return "Chinese (简体中文)" if _CJK.search(question) else "the language of the question"


def build_messages(question: str, passages: Sequence[Scored]) -> list[Turn]:
    numbered = "\n\n".join(
        f"[{i}] ({p.passage.title})\n{p.passage.text}" for i, p in enumerate(passages, start=1)
    )
    system = SYSTEM.format(language=question_language(question))
    return [
        Turn(role="system", content=system),
        Turn(role="user", content=f"Passages:\n{numbered}\n\nQuestion: {question}"),
    ]


def cited_indexes(answer: str, n_passages: int) -> list[int]:
    """The passage numbers the answer cites, in order of first mention, out-of-range ignored."""
    seen: dict[int, None] = {}
    for match in _MARKER.finditer(answer):
        n = int(match.group(1))
        if 1 <= n <= n_passages:
            seen.setdefault(n, None)
    return list(seen)
