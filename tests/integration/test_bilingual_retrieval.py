"""Bilingual retrieval over real HTTP, on the project's evaluation set
(benchmarks/data/retrieval_eval.json).  Once Chinese and English texts are both stored, scores
are language-centred: a question in one language cites the knowledge passage in the other,
unrelated questions (whose plain cosines pass the plain-cosine threshold) are refused, and a
case search in one language ranks the other-language case of its diagnosis above the
same-language cases of other diagnoses (issue 11's criterion)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from medserve.benchmarks.retrieval_eval import load_set
from medserve.server.settings import KnowledgeSettings

from tests.server_process import ServerProcess

DATA = load_set()


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("kb_bilingual_home")
    env = {
        "MEDSERVE_HOME": str(home),
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "2",
        "MEDSERVE_ENGINE_KV_CACHE_GB": "1",
        "MEDSERVE_CASES_DATA_DIR": str(home / "cases"),
        "MEDSERVE_KNOWLEDGE_DATA_DIR": str(home / "knowledge"),
    }
    with ServerProcess.start(tmp_path_factory.mktemp("kb_bilingual_log"), env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def passage_of(server: ServerProcess) -> dict[str, str]:
    """Document id -> evaluation passage id (one document per passage)."""
    documents = [
        {"title": p["title"], "text": p["text"], "source": p["id"]} for p in DATA["passages"]
    ]
    response = httpx.post(
        server.base_url + "/v1/documents", json={"documents": documents}, timeout=300
    )
    assert response.status_code == 200, response.text
    return {d["id"]: d["source"] for d in response.json()["data"]}


def _answer(server: ServerProcess, question: str, **extra: Any) -> dict[str, Any]:
    body = {"question": question, "top_k": 3, "max_tokens": 8, **extra}
    response = httpx.post(server.base_url + "/v1/answers", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _cross_language(question: dict[str, Any]) -> bool:
    return not question["support"][0].startswith(question["lang"] + "-")


def test_cross_language_questions_are_answered_from_the_other_language_passage(
    server: ServerProcess, passage_of: dict[str, str]
) -> None:
    centred = KnowledgeSettings().min_score_centred
    cross = [q for q in DATA["questions"] if _cross_language(q)]
    grounded = 0
    for question in cross:
        body = _answer(server, question["text"])
        assert body["scoring"] == "language_centred", body
        assert body["min_score"] == pytest.approx(centred)
        assert body["refused"] is False, question["id"]
        floor = KnowledgeSettings().context_min_score_centred
        assert body["context_min_score"] == pytest.approx(floor)
        assert body["passages"][0]["score"] >= centred
        assert all(p["score"] >= floor for p in body["passages"])
        used = {passage_of[p["document_id"]] for p in body["passages"]}
        assert {passage_of[c["document_id"]] for c in body["citations"]} <= used
        grounded += bool(used & set(question["support"]))
    # Measured 15/16 (RESULTS.md#cited-answers-v1answers-on-the-bilingual-set); plain cosines
    # 0/16: every Chinese passage outscores every English one for a Chinese question.
    assert grounded >= 15, f"{grounded}/{len(cross)} questions got their supporting passage"


def test_unrelated_questions_are_refused_on_the_centred_scale(
    server: ServerProcess, passage_of: dict[str, str]
) -> None:
    for question in DATA["unrelated_questions"]:
        body = _answer(server, question["text"])
        assert body["refused"] is True, (question["id"], body["passages"])
        assert body["scoring"] == "language_centred" and body["citations"] == []


def test_a_caller_threshold_overrides_the_default(
    server: ServerProcess, passage_of: dict[str, str]
) -> None:
    question = DATA["unrelated_questions"][0]["text"]
    body = _answer(server, question, min_score=-1.0)
    assert body["refused"] is False and body["min_score"] == -1.0
    assert len(body["passages"]) == 3


@pytest.fixture(scope="module")
def cases(server: ServerProcess) -> list[dict[str, Any]]:
    records = DATA["cases"]
    for start in range(0, len(records), 16):
        batch = [{"id": c["id"], "text": c["text"]} for c in records[start : start + 16]]
        response = httpx.post(server.base_url + "/v1/cases", json={"cases": batch}, timeout=300)
        assert response.status_code == 200, response.text
    return records  # type: ignore[no-any-return]


def _pair_passes(ranked: list[str], cases: list[dict[str, Any]], lang: str, dx: str) -> bool:
    """The other-language record of ``dx`` outranks every ``lang`` record of another diagnosis."""
    position = {case_id: i for i, case_id in enumerate(ranked)}
    (target,) = [c["id"] for c in cases if c["diagnosis"] == dx and c["lang"] != lang]
    rivals = [c["id"] for c in cases if c["lang"] == lang and c["diagnosis"] != dx]
    assert set(position) >= {target, *rivals}, "every case is ranked"
    return all(position[target] < position[r] for r in rivals)


def _search(server: ServerProcess, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(server.base_url + "/v1/cases/search", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_case_search_finds_the_other_language_case_of_the_diagnosis(
    server: ServerProcess, cases: list[dict[str, Any]]
) -> None:
    k = len(cases)
    text_passes = 0
    for query in DATA["case_queries"]:
        found = _search(server, {"text": query["text"], "k": k})
        assert found["scoring"] == "language_centred"
        ranked = [m["case"]["id"] for m in found["data"]]
        text_passes += _pair_passes(ranked, cases, query["lang"], query["diagnosis"])
    record_passes = 0
    paired = [c for c in cases if sum(o["diagnosis"] == c["diagnosis"] for o in cases) == 2]
    for record in paired:
        found = _search(server, {"case_id": record["id"], "k": k - 1})
        ranked = [m["case"]["id"] for m in found["data"]]
        assert record["id"] not in ranked
        record_passes += _pair_passes(ranked, cases, record["lang"], record["diagnosis"])
    # Measured (RESULTS.md#retrieval-across-chinese-and-english): 16/20 text and 18/20 record
    # queries pass, against 0/20 and 0/20 with plain cosines.
    assert text_passes >= 16 and record_passes >= 18, (text_passes, record_passes)
