"""Language-centred case search: the running language means stay exact under inserts, updates,
deletes and restarts; centring starts only when two languages are each large enough; the
per-language candidate walk finds what exact centred search finds; and a bilingual pair that
plain cosine misses is found once centred.

Vectors are synthetic (a topic direction plus a large per-language offset, the shape
multilingual-e5's bias has, benchmarks/RESULTS.md#retrieval-across-chinese-and-english); the
text only sets each case's language ("case N" is English, "病例 N" Chinese)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from medserve.accel.embedding_debias import LanguageDebias
from medserve.server.cases.filters import Filters
from medserve.server.cases.languages import CollectionLanguages
from medserve.server.cases.service import CaseService, Match
from medserve.server.cases.store import CaseRecord
from medserve.server.settings import CasesSettings

DIM = 48
DEPARTMENTS = ("Cardiology", "Neurology", "Pediatrics")


class _NoModel:
    name = "test-vectors"
    dim = DIM


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class _Corpus:
    """Topics shared by both languages; each language adds its own large offset."""

    def __init__(self, seed: int, topics: int, offset: float = 1.6, noise: float = 0.35) -> None:
        self.rng = np.random.default_rng(seed)
        self.topics = _unit(self.rng.standard_normal((topics, DIM)))
        self.offsets = {
            lang: _unit(self.rng.standard_normal(DIM)) * offset for lang in ("en", "zh")
        }
        self.noise = noise

    def vector(self, topic: int, lang: str) -> np.ndarray:
        noise = self.noise * _unit(self.rng.standard_normal(DIM))
        x = self.topics[topic] + self.offsets[lang] + noise
        return _unit(x)


def _text(i: int, lang: str) -> str:
    return f"case {i}" if lang == "en" else f"病例 {i}"


def _service(tmp_path: Path, **settings: object) -> CaseService:
    values = {"data_dir": tmp_path, "initial_capacity": 16, "language_min_texts": 8, **settings}
    service = CaseService(CasesSettings(**values), _NoModel())  # type: ignore[arg-type]
    service.open()
    return service


def _fill(
    service: CaseService, corpus: _Corpus, n: int, seed: int = 0
) -> tuple[list[CaseRecord], np.ndarray, list[str], list[int]]:
    rng = np.random.default_rng(seed)
    records, vectors, langs, topics = [], [], [], []
    for i in range(n):
        lang = "zh" if rng.random() < 0.5 else "en"
        topic = int(rng.integers(len(corpus.topics)))
        records.append(
            CaseRecord(
                case_id=f"c{i}", text=_text(i, lang), department=DEPARTMENTS[i % len(DEPARTMENTS)]
            )
        )
        vectors.append(corpus.vector(topic, lang))
        langs.append(lang)
        topics.append(topic)
    matrix = np.stack(vectors)
    for start in range(0, n, 500):
        service.upsert_embedded(records[start : start + 500], matrix[start : start + 500])
    return records, matrix, langs, topics


def _means(vectors: np.ndarray, langs: list[str]) -> dict[str, np.ndarray]:
    return LanguageDebias.fit(vectors, langs).means


# -- CollectionLanguages ----------------------------------------------------------------------


def test_running_means_equal_means_from_scratch_after_puts_updates_and_removes() -> None:
    rng = np.random.default_rng(1)
    languages = CollectionLanguages(DIM, min_texts=2)
    vectors = _unit(rng.standard_normal((60, DIM)))
    langs = ["zh" if i % 3 else "en" for i in range(60)]
    languages.put(list(range(60)), vectors, langs)
    live = dict(enumerate(zip(vectors, langs, strict=True)))
    for label in range(0, 60, 4):  # updates: new vector, and every other one a new language
        languages.remove(label, live[label][0])
        new = _unit(rng.standard_normal(DIM))
        lang = ("en", "zh")[label % 8 == 0]
        languages.put([label], new[None, :], [lang])
        live[label] = (new, lang)
    for label in range(1, 60, 5):  # deletes
        languages.remove(label, live.pop(label)[0])
    languages.remove(1, vectors[1])  # already gone: a no-op, not a second subtraction
    languages.remove(10_000, vectors[0])  # never stored

    kept = sorted(live)
    expect = _means(np.stack([live[i][0] for i in kept]), [live[i][1] for i in kept])
    debias = languages.debias()
    assert debias is not None
    for lang in ("en", "zh"):
        np.testing.assert_allclose(debias.means[lang], expect[lang], atol=1e-6)
    assert languages.counts() == {
        lang: sum(live[i][1] == lang for i in kept) for lang in ("en", "zh")
    }
    assert languages.language(0) == live[0][1]
    assert languages.language(1) is None


def test_centring_waits_for_two_languages_with_enough_texts_and_can_be_disabled() -> None:
    rng = np.random.default_rng(2)
    languages = CollectionLanguages(DIM, min_texts=5)
    languages.put(list(range(50)), _unit(rng.standard_normal((50, DIM))), ["en"] * 50)
    assert languages.debias() is None  # one language: no bias to remove
    languages.put(list(range(50, 54)), _unit(rng.standard_normal((4, DIM))), ["zh"] * 4)
    assert languages.debias() is None and languages.scoring() == "cosine"
    languages.put([54], _unit(rng.standard_normal((1, DIM))), ["zh"])
    assert languages.scoring() == "language_centred"
    assert set(languages.debias().means) == {"en", "zh"}  # type: ignore[union-attr]

    disabled = CollectionLanguages(DIM, min_texts=5, enabled=False)
    disabled.put(list(range(20)), _unit(rng.standard_normal((20, DIM))), ["en", "zh"] * 10)
    assert disabled.debias() is None and disabled.scoring() == "cosine"


def test_languages_of_labels_grows_with_labels() -> None:
    languages = CollectionLanguages(DIM, min_texts=2)
    rng = np.random.default_rng(3)
    languages.put([3, 5000], _unit(rng.standard_normal((2, DIM))), ["zh", "en"])
    assert languages.languages_of(np.array([3, 5000, 7])) == ["zh", "en", ""]
    assert languages.language(5000) == "en" and languages.language(4999) is None


# -- the case service --------------------------------------------------------------------------


def test_centred_search_finds_the_other_language_case_that_plain_cosine_misses(
    tmp_path: Path,
) -> None:
    corpus = _Corpus(seed=4, topics=12)
    service = _service(tmp_path)
    try:
        records, _, _, topics = _fill(service, corpus, 120, seed=4)
        topic_of = {r.case_id: t for r, t in zip(records, topics, strict=True)}
        # The pair: an English case of topic 0, queried in Chinese.
        target = CaseRecord(case_id="target", text="case target", department="Cardiology")
        service.upsert_embedded([target], corpus.vector(0, "en")[None, :])
        query = corpus.vector(0, "zh")

        def zh_other_topic(match: Match) -> bool:
            return match.record.text.startswith("病例") and topic_of[match.record.case_id] != 0

        # Plain cosine (no query language): Chinese cases of other topics outrank the pair.
        raw = service.search_vector(query, 121)
        raw_target = next(m.score for m in raw if m.record.case_id == "target")
        assert any(zh_other_topic(m) and m.score > raw_target for m in raw)

        assert service.scoring() == "language_centred"
        centred = service.search_vector(query, 121, language="zh")
        target_score = next(m.score for m in centred if m.record.case_id == "target")
        assert not [
            m.record.case_id for m in centred if zh_other_topic(m) and m.score >= target_score
        ]
    finally:
        service.close()


@pytest.mark.parametrize("filtered", [False, True])
def test_candidate_walk_recalls_exact_centred_search(tmp_path: Path, filtered: bool) -> None:
    corpus = _Corpus(seed=5, topics=40)
    service = _service(tmp_path, initial_capacity=4096, exact_search_max=256)
    try:
        records, vectors, langs, _ = _fill(service, corpus, 3000, seed=5)
        debias = service.languages.debias()
        assert debias is not None
        np.testing.assert_allclose(debias.means["zh"], _means(vectors, langs)["zh"], atol=1e-5)
        centred = debias.apply(vectors, langs)
        filters = Filters(departments=("Neurology",)) if filtered else None
        allowed = np.array(
            [not filtered or r.department == "Neurology" for r in records], dtype=bool
        )
        rng = np.random.default_rng(6)
        recalls = []
        for _ in range(40):
            lang = ("en", "zh")[int(rng.integers(2))]
            query = corpus.vector(int(rng.integers(40)), lang)
            q = debias.apply(query[None, :], [lang])[0]
            scores = np.where(allowed, centred @ q, -np.inf)
            exact = {records[i].case_id for i in np.argsort(-scores)[:10]}
            got = service.search_vector(query, 10, filters, language=lang)
            assert len(got) == 10
            if filtered:
                assert all(m.record.department == "Neurology" for m in got)
            recalls.append(len(exact & {m.record.case_id for m in got}) / 10)
        assert np.mean(recalls) >= 0.95, recalls
    finally:
        service.close()


def test_means_follow_updates_and_deletes_and_are_rebuilt_on_reopen(tmp_path: Path) -> None:
    corpus = _Corpus(seed=7, topics=6)
    service = _service(tmp_path)
    records, vectors, langs, _ = _fill(service, corpus, 60, seed=7)
    live = {r.case_id: (v, lang) for r, v, lang in zip(records, vectors, langs, strict=True)}
    # An English case rewritten in Chinese, and two cases deleted.
    moved = next(r for r, lang in zip(records, langs, strict=True) if lang == "en")
    new_vector = corpus.vector(1, "zh")
    service.upsert_embedded([CaseRecord(case_id=moved.case_id, text="病例 改")], new_vector[None])
    live[moved.case_id] = (new_vector, "zh")
    for case_id in ("c3", "c4"):
        assert service.delete_sync(case_id)
        live.pop(case_id)
    expect = _means(np.stack([v for v, _ in live.values()]), [lang for _, lang in live.values()])
    before = service.languages.debias()
    assert before is not None
    for lang in ("en", "zh"):
        np.testing.assert_allclose(before.means[lang], expect[lang], atol=1e-5)
    counts = service.languages.counts()
    service.close()

    reopened = _service(tmp_path)
    try:
        assert reopened.languages.counts() == counts
        after = reopened.languages.debias()
        assert after is not None
        for lang in ("en", "zh"):
            np.testing.assert_allclose(after.means[lang], expect[lang], atol=1e-5)
    finally:
        reopened.close()


def test_rows_without_a_language_get_one_at_open(tmp_path: Path) -> None:
    """Rows written before the lang column existed (NULL) are detected from their text."""
    corpus = _Corpus(seed=8, topics=4)
    service = _service(tmp_path)
    _fill(service, corpus, 40, seed=8)
    counts = service.languages.counts()
    service.close()
    databases = list(tmp_path.rglob("*.sqlite3")) + list(tmp_path.rglob("*.db"))
    assert len(databases) == 1, databases
    with sqlite3.connect(databases[0]) as db:
        assert db.execute("UPDATE cases SET lang = NULL").rowcount == 40

    reopened = _service(tmp_path)
    try:
        assert reopened.languages.counts() == counts
        with sqlite3.connect(databases[0]) as db:
            assert db.execute("SELECT count(*) FROM cases WHERE lang IS NULL").fetchone() == (0,)
    finally:
        reopened.close()
