"""Splits a document into passages of about ``size`` characters, with character offsets.

Each passage is ``text[start:end]`` of the stored document text exactly, so a citation's
offsets always point at the words the answer was built from.  Cuts fall, in order of
preference, at a paragraph break, a sentence end (Latin or Chinese punctuation), a clause
break, whitespace -- and only as a last resort mid-word.  Consecutive passages overlap by
about ``overlap`` characters (moved forward to a sentence start) so a fact split by a cut is
still whole in one of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])")
_CLAUSE = re.compile(r"(?<=[;:,，、：])\s*")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int
    text: str


def embedding_text(title: str, passage: str) -> str:
    """What a passage's vector is computed from.  The title goes into the vector (not into the
    passage text): "Metformin" in a title makes its passages findable by a question that
    names only the drug."""
    return f"{title}\n{passage}"


def chunk_text(text: str, *, size: int = 700, overlap: int = 100) -> list[Chunk]:
    """Passages covering every non-blank character of ``text``; none longer than ``size``."""
    if size < 50 or not 0 <= overlap < size // 2:
        raise ValueError("size must be >= 50 and 0 <= overlap < size/2")
    chunks: list[Chunk] = []
    start = _skip_space(text, 0)
    while start < len(text):
        end = len(text) if len(text) - start <= size else _cut(text, start, size)
        stripped_end = end
        while stripped_end > start and text[stripped_end - 1].isspace():
            stripped_end -= 1
        if stripped_end > start:
            chunks.append(Chunk(start, stripped_end, text[start:stripped_end]))
        if end >= len(text):
            break
        start = _skip_space(text, _next_start(text, start, end, overlap))
    return chunks


def _cut(text: str, start: int, size: int) -> int:
    """The best cut in text[start:start+size], no earlier than halfway (passages stay full)."""
    window = text[start : start + size]
    floor = size // 2
    for pattern in (_PARAGRAPH, _SENTENCE, _CLAUSE, _SPACE):
        cuts = [m.end() for m in pattern.finditer(window) if m.end() >= floor]
        if cuts:
            return start + max(cuts)
    return start + size


def _next_start(text: str, start: int, end: int, overlap: int) -> int:
    """Where the next passage begins: ``overlap`` characters back from ``end``, moved forward
    to the next sentence (or word) start so a passage never opens mid-word."""
    if overlap == 0:
        return end
    back = max(start + 1, end - overlap)
    region = text[back:end]
    for pattern in (_SENTENCE, _SPACE):
        match = pattern.search(region)
        if match and match.end() < len(region):
            return back + match.end()
    return end


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i
