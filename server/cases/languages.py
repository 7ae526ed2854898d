"""The language of every stored text in a collection, and each language's mean vector.

Why: multilingual-e5 scores a Chinese query higher against *any* Chinese text than against the
English text that says the same thing (benchmarks/RESULTS.md#retrieval-across-chinese-and-english:
0/40 bilingual case pairs pass).  Centring each language at its own mean before the cosine
(accel/embedding_debias.py) lets the topic decide (34/40 pass, same-language recall unchanged).

The means are statistics of the stored texts of *this* collection (cases and knowledge
passages need their own: measured worse when pooled).  They are kept exact in memory under
inserts, updates and deletes (running sums in float64) and recomputed from SQLite at start-up,
so they need no snapshot of their own and can never disagree with the database.

Centring applies only once at least two languages each have ``min_texts`` stored texts: with
one language there is no bias to remove, and the mean of a handful of texts is mostly their
topic (centring would subtract the very thing a query looks for).  Until then scores are plain
cosines -- which is why every search result says which ``scoring`` it used.

The hnswlib graph keeps the raw vectors, so the means can move without a re-index.  A search
walks the graph once, unfiltered by language, with the centred query q' = unit(q - mean[lang(q)])
projected off the span of the language means (``walk_query``): a stored unit vector v of
language L then scores v . q = (v - mean[L]) . q, the centred numerator with no per-language
offset, so both languages come up in nearly their centred order (up to each text's
|v - mean[L]|).  The best ``candidate_pool(k)`` are rescored exactly.  A plain walk per
language, filtered by language, was measured 5x slower: hnswlib calls the Python filter for
every node it visits.  tests/unit/test_case_languages.py measures recall against exact centred
search.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from medserve.accel.embedding_debias import LanguageDebias, detect_language
from medserve.server.cases.index import Hit

LANGUAGES = ("en", "zh")
_CODE = {lang: i for i, lang in enumerate(LANGUAGES)}
_NONE = -1

Scoring = Literal["cosine", "language_centred"]


def language_of(text: str) -> str:
    return detect_language(text)


def candidate_pool(k: int) -> int:
    """Candidates the walk returns for exact centred rescoring.  Measured on synthetic
    bilingual data with near-ties (tests/unit/test_case_languages.py): a pool of 4k misses
    a quarter of the exact centred top k, 8k misses none."""
    return max(8 * k, 80)


class CollectionLanguages:
    """Thread-safe.  Labels are the collection's hnswlib labels; vectors are unit vectors."""

    def __init__(self, dim: int, *, min_texts: int, enabled: bool = True) -> None:
        self.min_texts = min_texts
        self.enabled = enabled
        self._lock = threading.Lock()
        self._codes = np.full(1024, _NONE, dtype=np.int8)
        self._sums = np.zeros((len(LANGUAGES), dim), dtype=np.float64)
        self._counts = np.zeros(len(LANGUAGES), dtype=np.int64)

    # -- changes ------------------------------------------------------------------------

    def put(self, labels: Sequence[int], vectors: np.ndarray, languages: Sequence[str]) -> None:
        """Adds texts; a label already present is replaced (call ``remove`` with its old
        vector first -- the running sum needs it)."""
        vectors = _unit(vectors)
        with self._lock:
            need = int(max(labels, default=-1)) + 1
            if need > len(self._codes):
                grown = np.full(max(need, 2 * len(self._codes)), _NONE, dtype=np.int8)
                grown[: len(self._codes)] = self._codes
                self._codes = grown
            for label, vector, lang in zip(labels, vectors, languages, strict=True):
                code = _CODE[lang]
                self._codes[int(label)] = code
                self._sums[code] += vector
                self._counts[code] += 1

    def remove(self, label: int, vector: np.ndarray) -> None:
        """Forgets a text; ``vector`` is the one it was added with."""
        with self._lock:
            if not 0 <= label < len(self._codes) or self._codes[label] == _NONE:
                return
            code = int(self._codes[label])
            self._codes[label] = _NONE
            self._sums[code] -= _unit(vector[None, :])[0]
            self._counts[code] -= 1
            if self._counts[code] == 0:
                self._sums[code] = 0.0  # no float residue left behind by the subtractions

    # -- reads --------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {lang: int(self._counts[i]) for i, lang in enumerate(LANGUAGES)}

    def language(self, label: int) -> str | None:
        with self._lock:
            if 0 <= label < len(self._codes) and self._codes[label] != _NONE:
                return LANGUAGES[int(self._codes[label])]
            return None

    def debias(self) -> LanguageDebias | None:
        """The centring to use now, or None while scores stay plain cosines (see module doc)."""
        if not self.enabled:
            return None
        with self._lock:
            ready = [i for i in range(len(LANGUAGES)) if self._counts[i] >= self.min_texts]
            if len(ready) < 2:
                return None
            means = {
                LANGUAGES[i]: (self._sums[i] / self._counts[i]).astype(np.float32) for i in ready
            }
        return LanguageDebias(means=means)

    def languages_of(self, labels: np.ndarray) -> list[str]:
        with self._lock:
            codes = self._codes[np.minimum(labels, len(self._codes) - 1)]
        return [LANGUAGES[c] if c != _NONE else "" for c in codes.tolist()]

    def scoring(self) -> Scoring:
        return "cosine" if self.debias() is None else "language_centred"


def centred_query(debias: LanguageDebias, query: np.ndarray, query_lang: str) -> np.ndarray:
    """The query as scored: its language's mean removed, re-normalised (see module doc)."""
    return debias.apply(np.asarray(query, dtype=np.float32)[None, :], [query_lang])[0]


def walk_query(debias: LanguageDebias, centred: np.ndarray) -> np.ndarray:
    """The vector to walk the raw graph with: ``centred`` with its components along the
    language means removed, so that every stored v of language L scores v . q = (v - mean[L]) . q
    -- the centred numerator, with no per-language offset (see module doc)."""
    basis, _ = np.linalg.qr(np.stack(list(debias.means.values())).T.astype(np.float64))
    walk = centred - basis @ (basis.T @ centred)
    norm = float(np.linalg.norm(walk))
    return (walk / norm).astype(np.float32) if norm > 1e-6 else centred


def centred_search(
    debias: LanguageDebias,
    vector: np.ndarray,
    query_lang: str,
    k: int,
    walk: Callable[[np.ndarray, int], list[Hit]],
    vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    languages: CollectionLanguages,
) -> list[Hit]:
    """The k best stored texts by centred cosine: ``walk(query, n)`` (the collection's plain
    graph search, with its filters) gives ``candidate_pool(k)`` candidates for the
    ``walk_query``; they are rescored exactly (see module doc)."""
    query = centred_query(debias, vector, query_lang)
    candidates = walk(walk_query(debias, query), candidate_pool(k))
    return centred_hits(debias, query, candidates, vectors_of, languages, k)


def centred_hits(
    debias: LanguageDebias,
    query: np.ndarray,
    candidates: Sequence[Hit],
    vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    languages: CollectionLanguages,
    k: int,
) -> list[Hit]:
    """The best k of ``candidates`` by centred cosine with ``query`` (a ``centred_query``).
    ``vectors_of(labels)`` returns (labels found, their vectors, unit or not): a candidate
    deleted meanwhile is simply dropped."""
    labels = np.unique(np.fromiter((h.label for h in candidates), dtype=np.int64))
    if len(labels) == 0:
        return []
    labels, matrix = vectors_of(labels)
    if len(labels) == 0:
        return []
    scores = debias.apply(_unit(matrix), languages.languages_of(labels)) @ query
    top = np.argsort(-scores, kind="stable")[:k]
    return [Hit(int(labels[i]), float(scores[i])) for i in top]


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
