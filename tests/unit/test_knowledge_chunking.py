"""Passages: exact offsets into the document, bounded size, cuts at sentence ends, overlap."""

from __future__ import annotations

import itertools

import pytest
from medserve.server.knowledge.answering import cited_indexes
from medserve.server.knowledge.chunking import chunk_text

ENGLISH = (
    "Hypertension is diagnosed at 140/90 mmHg or higher. Confirm with home monitoring. " * 12
    + "\n\n"
    + "Start an ACE inhibitor under 55 years; a calcium channel blocker from 55 years. " * 10
)
CHINESE = (
    "二甲双胍是2型糖尿病的一线用药。起始剂量为每次500毫克！肾功能不全时需减量？注意乳酸酸中毒；"
    * 30
)


@pytest.mark.parametrize("text", [ENGLISH, CHINESE, ENGLISH + "\n\n" + CHINESE])
def test_offsets_are_exact_and_sizes_bounded(text: str) -> None:
    chunks = chunk_text(text, size=300, overlap=60)
    assert len(chunks) > 2
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text
        assert 0 < len(chunk.text) <= 300
        assert chunk.text == chunk.text.strip()
    # Every non-blank character is in some passage.
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.start, chunk.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_consecutive_passages_overlap() -> None:
    chunks = chunk_text(ENGLISH, size=300, overlap=60)
    for a, b in itertools.pairwise(chunks):
        assert b.start < a.end, "the next passage starts inside the previous one"
        assert b.start > a.start


def test_cuts_fall_at_sentence_ends_in_both_scripts() -> None:
    for text, ends in ((ENGLISH, ".;"), (CHINESE, "。！？；")):
        for chunk in chunk_text(text, size=300, overlap=60)[:-1]:
            assert chunk.text[-1] in ends, chunk.text[-10:]


def test_paragraph_break_preferred() -> None:
    text = "A" * 10 + ". " + "First paragraph sentence. " * 8 + "\n\n" + "Second paragraph. " * 5
    first = chunk_text(text, size=len(text) - 5, overlap=0)[0]
    assert first.text.endswith("First paragraph sentence.")


def test_short_text_is_one_passage_and_blank_is_none() -> None:
    assert [c.text for c in chunk_text("  Short note.  ", size=300, overlap=50)] == ["Short note."]
    assert chunk_text(" \n\n ", size=300, overlap=50) == []


def test_text_without_breaks_is_cut_hard() -> None:
    text = "x" * 1000
    chunks = chunk_text(text, size=300, overlap=0)
    assert "".join(c.text for c in chunks) == text


def test_cited_indexes() -> None:
    assert cited_indexes("Use amlodipine [2], see also [1] and [2] and [9].", 3) == [2, 1]
    assert cited_indexes("No markers.", 3) == []
