"""Language debiasing for multilingual embeddings: remove each language's mean direction.

multilingual-e5 puts a strong "which language is this" component into every vector, so a
Chinese query scores Chinese texts higher than an English text saying the same thing.  That
component is close to the mean vector of each language, so subtracting each language's own mean
(centring every language at the origin) before cosine lets the topic decide.  Measured on
benchmarks/data/retrieval_eval.json by benchmarks/retrieval_eval.py; shifting every language to
the common centre instead, or projecting out only the zh-en difference, helped English queries
but left Chinese ones biased (the shared mean direction then still dominates the cosine).

Use: fit once on vectors of stored texts (passages) of every language, then ``apply`` to both
stored vectors and query vectors, each with its own language, and re-index the stored ones.
The means are tied to the embedder that produced them: refit when the model changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# CJK Unified Ideographs (+ extension A) and CJK punctuation / full-width forms.
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0x3000, 0x303F), (0xFF00, 0xFFEF))


def detect_language(text: str) -> str:
    """'zh' when the CJK characters are at least half as many as the Latin words, else 'en'.

    Chinese clinical notes are full of Latin abbreviations (NT-proBNP, INR, CT), and English
    notes may quote a Chinese term, so neither "any CJK character" nor "any Latin letter" works.
    """
    cjk = latin = 0
    for ch in text:
        code = ord(ch)
        if any(lo <= code <= hi for lo, hi in _CJK_RANGES):
            cjk += 1
        elif ch.isascii() and ch.isalpha():
            latin += 1
    # A CJK character carries roughly a word; weigh Latin letters by a typical word length.
    return "zh" if cjk and cjk >= (latin / 5) / 2 else "en"


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class LanguageDebias:
    """Per-language mean vectors; ``apply`` maps vectors to a language-neutral space."""

    means: dict[str, np.ndarray]

    @classmethod
    def fit(cls, vectors: np.ndarray, languages: Sequence[str]) -> LanguageDebias:
        """Means of L2-normalised ``vectors`` per language (at least two texts per language)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(vectors) != len(languages):
            raise ValueError(f"{len(vectors)} vectors but {len(languages)} languages")
        langs = np.asarray(languages)
        means: dict[str, np.ndarray] = {}
        for lang in sorted(set(languages)):
            rows = vectors[langs == lang]
            if len(rows) < 2:
                raise ValueError(
                    f"language {lang!r} needs at least 2 texts to fit, got {len(rows)}"
                )
            means[lang] = rows.mean(axis=0)
        # Per language, not over the whole corpus: a corpus that is 90% Chinese must not leave
        # the English texts off-centre.
        return cls(means={lang: m.astype(np.float32) for lang, m in means.items()})

    def apply(self, vectors: np.ndarray, languages: Sequence[str]) -> np.ndarray:
        """``v - mean[lang]``, re-normalised; languages not fitted are left as they are."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(vectors) != len(languages):
            raise ValueError(f"{len(vectors)} vectors but {len(languages)} languages")
        zero = np.zeros(vectors.shape[1], dtype=np.float32)
        shifts = np.stack([self.means.get(lang, zero) for lang in languages] or [zero])
        return _normalise(vectors - shifts[: len(vectors)])

    def apply_texts(self, vectors: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """``apply`` with each text's language detected (what a server would do)."""
        return self.apply(vectors, [detect_language(t) for t in texts])
