"""Ingest, search and recovery of the knowledge base: SQLite first, then the index.

Reuses the case index's machinery (``VectorIndex`` for hnswlib with its crash-safe snapshots,
the e5 ``Embedder``).  A document is acknowledged once its SQLite transaction committed; the
index is updated afterwards and saved at shutdown.  At start-up the saved snapshot is used only
if it was taken at the database's current seq and holds exactly its passages -- otherwise
(missing, corrupt, stale, other parameters) it is rebuilt from the vectors in SQLite, which is
cheap at knowledge-base sizes (thousands of passages).

Scores are language-centred once Chinese and English passages are both stored (the case index's
machinery, server/cases/languages.py); the passages' languages are detected again from their
text at start-up, which at knowledge-base sizes takes well under a second.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from medserve.accel.embeddings import Embedder
from medserve.server.cases.index import (
    Hit,
    IndexParams,
    IndexUnusable,
    SearchIncomplete,
    VectorIndex,
)
from medserve.server.cases.languages import (
    CollectionLanguages,
    Scoring,
    centred_search,
    language_of,
)
from medserve.server.knowledge.chunking import Chunk, chunk_text, embedding_text
from medserve.server.knowledge.store import Document, KnowledgeStore, Passage
from medserve.server.settings import KnowledgeSettings

log = structlog.get_logger("medserve.knowledge")

DB_NAME = "knowledge.sqlite3"
_EMBED_CHUNK = 8


@dataclass(frozen=True)
class Scored:
    passage: Passage
    score: float


@dataclass(frozen=True)
class Retrieved:
    passages: list[Scored]
    scoring: Scoring
    """What ``score`` is: plain cosine, or language-centred cosine (another scale)."""


class KnowledgeService:
    def __init__(self, settings: KnowledgeSettings, embedder: Embedder) -> None:
        self.settings = settings
        self.embedder = embedder
        self.directory = Path(settings.data_dir)
        self.params = IndexParams(
            dim=embedder.dim,
            m=settings.hnsw_m,
            ef_construction=settings.hnsw_ef_construction,
            threads=os.cpu_count() or 1,
        )
        self.store: KnowledgeStore | None = None
        self.index: VectorIndex | None = None
        self.loaded = False
        self.live = 0
        """Passages in the index (searches never ask hnswlib for more than exist)."""
        self.languages = CollectionLanguages(
            embedder.dim,
            min_texts=settings.language_min_texts,
            enabled=settings.language_centring,
        )
        self._write_lock = threading.Lock()
        self._dirty = False
        self._embed_pool = ThreadPoolExecutor(1, thread_name_prefix="medserve-kb-embed")

    # -- lifecycle (blocking) ---------------------------------------------------------------

    def open(self) -> None:
        started = time.perf_counter()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = KnowledgeStore(
            self.directory / DB_NAME, embedder=self.embedder.name, dim=self.embedder.dim
        )
        self.store = store
        live = store.labels()
        rebuilding = False
        try:
            index, seq = VectorIndex.load(self.directory, self.params)
            if seq != store.current_seq():
                raise IndexUnusable(f"snapshot at seq {seq}, database at {store.current_seq()}")
            if index.slots_used != len(live) or not np.isin(live, index.labels()).all():
                raise IndexUnusable("snapshot passages differ from the database")
            log.info("knowledge.index_loaded", passages=len(live))
        except IndexUnusable as exc:
            level = log.warning if len(live) else log.info
            level("knowledge.index_rebuild", reason=str(exc), passages=len(live))
            index = VectorIndex.create(self.params, capacity=max(1024, len(live) * 2))
            rebuilding = self._dirty = True
        # One read of the passages serves the language means and, when needed, the rebuild.
        for labels, texts, vectors in store.iter_passage_texts():
            if rebuilding:
                index.add(vectors, labels, existing=np.zeros(len(labels), dtype=bool))
            self.languages.put(labels, vectors, [language_of(t) for t in texts])
        self.index = index
        self.live = len(live)
        self.loaded = True
        log.info(
            "knowledge.ready",
            passages=self.live,
            scoring=self.languages.scoring(),
            seconds=round(time.perf_counter() - started, 2),
            **self.languages.counts(),
        )

    def close(self) -> None:
        self._embed_pool.shutdown(wait=True, cancel_futures=True)
        with self._write_lock:
            if self.loaded:
                self._snapshot_locked()
            self.loaded = False
            if self.store is not None:
                self.store.close()
                self.store = None

    def _snapshot_locked(self) -> None:
        """Saves the index (caller holds the write lock, so it matches the database's seq)."""
        if not self._dirty or self.index is None or self.store is None:
            return
        seq = self.store.current_seq()
        tmp = self.index.dump(self.directory, seq)
        self.index.publish(self.directory, tmp, seq)
        self._dirty = False
        log.info("knowledge.snapshot_saved", seq=seq, passages=self.live)

    # -- embedding --------------------------------------------------------------------------

    async def _embed(self, texts: Sequence[str], *, query: bool) -> np.ndarray:
        fn = self.embedder.embed_queries if query else self.embedder.embed_passages
        loop = asyncio.get_running_loop()
        parts = []
        # Small chunks: a question's embedding waits for at most one chunk of a long ingest.
        for lo in range(0, len(texts), _EMBED_CHUNK):
            parts.append(
                await loop.run_in_executor(
                    self._embed_pool, fn, list(texts[lo : lo + _EMBED_CHUNK])
                )
            )
        if not parts:
            return np.empty((0, self.embedder.dim), dtype=np.float32)
        return np.concatenate(parts)

    # -- documents --------------------------------------------------------------------------

    async def add(
        self, *, title: str, text: str, fmt: str, source: str | None, language: str | None
    ) -> Document:
        chunks = chunk_text(
            text, size=self.settings.chunk_chars, overlap=self.settings.chunk_overlap_chars
        )
        vectors = await self._embed([embedding_text(title, c.text) for c in chunks], query=False)
        return await asyncio.to_thread(
            self._add_embedded, title, text, fmt, source, language, chunks, vectors
        )

    def _add_embedded(
        self,
        title: str,
        text: str,
        fmt: str,
        source: str | None,
        language: str | None,
        chunks: Sequence[Chunk],
        vectors: np.ndarray,
    ) -> Document:
        store, index = self._require()
        with self._write_lock:
            doc, labels = store.add(
                title=title,
                source=source,
                language=language,
                fmt=fmt,
                text=text,
                chunks=chunks,
                vectors=vectors,
            )
            # Committed: if the lines below fail, the next start rebuilds from SQLite.
            index.add(vectors, labels, existing=np.zeros(len(labels), dtype=bool))
            self.languages.put(labels, vectors, [language_of(c.text) for c in chunks])
            self.live += len(labels)
            self._dirty = True
        log.info("knowledge.document_added", document_id=doc.id, passages=len(labels))
        return doc

    async def get(self, document_id: str) -> Document | None:
        return await asyncio.to_thread(self._require()[0].get, document_id)

    async def list(self) -> list[Document]:
        return await asyncio.to_thread(self._require()[0].list)

    async def delete(self, document_id: str) -> bool:
        return await asyncio.to_thread(self._delete, document_id)

    def _delete(self, document_id: str) -> bool:
        store, index = self._require()
        with self._write_lock:
            labels = store.delete(document_id)
            if labels is None:
                return False
            # Results are read back from SQLite, so a search racing this never returns the
            # deleted passages even before they are marked deleted here.
            found, vectors = index.vectors(labels)
            for label, vector in zip(found.tolist(), vectors, strict=True):
                self.languages.remove(label, vector)
            for label in labels:
                index.mark_deleted(int(label))
            self.live -= len(labels)
            self._dirty = True
        log.info("knowledge.document_deleted", document_id=document_id, passages=len(labels))
        return True

    # -- search -----------------------------------------------------------------------------

    async def search(self, question: str, k: int) -> Retrieved:
        vector = (await self._embed([question], query=True))[0]
        return await asyncio.to_thread(self._search_vector, vector, k, language_of(question))

    def _search_vector(self, vector: np.ndarray, k: int, language: str) -> Retrieved:
        store, index = self._require()
        debias = self.languages.debias()
        if debias is None:
            hits = self._cosine_hits(index, vector, k)
        else:
            hits = centred_search(
                debias,
                vector,
                language,
                k,
                lambda query, n: self._cosine_hits(index, query, n),
                index.vectors,
                self.languages,
            )
        passages = store.passages([h.label for h in hits])
        return Retrieved(
            [Scored(passages[h.label], h.score) for h in hits if h.label in passages],
            "cosine" if debias is None else "language_centred",
        )

    def _cosine_hits(self, index: VectorIndex, vector: np.ndarray, k: int) -> list[Hit]:
        ef = self.settings.hnsw_ef_search
        want = min(k, self.live)
        if want <= 0:
            return []
        try:
            return index.search(vector, want, ef=ef, candidates=self.live)
        except SearchIncomplete:
            return index.search(vector, want, ef=max(want, ef * 4))

    def _require(self) -> tuple[KnowledgeStore, VectorIndex]:
        if self.store is None or self.index is None:
            raise RuntimeError("knowledge base is not open")
        return self.store, self.index
