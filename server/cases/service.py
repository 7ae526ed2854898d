"""Ingest, search and recovery: SQLite first, then the index, never the other way round.

Durability: a case is acknowledged only after its SQLite transaction committed (WAL,
synchronous=FULL).  The index is updated afterwards and saved now and then; at start-up it is
loaded from its last snapshot and brought up to date from SQLite (rows whose seq is newer are
replayed, labels no longer in SQLite are marked deleted).  A missing or corrupt snapshot, or
one that does not match the database, is rebuilt from the vectors stored in SQLite.  So kill -9
at any instant loses nothing that was acknowledged.

Locking:
* ``_write_lock`` (thread lock) serialises every mutation -- SQLite write, index update, filter
  attributes -- and the snapshot dump, so a snapshot is exactly the database at its seq.
* Searches take no service lock, only the index's read lock; inserts take its write lock 16
  vectors at a time (hnswlib cannot search during an insert), so a search runs between
  slices of an ingest.  Results are read back
  from SQLite, so a case deleted meanwhile is dropped, never returned stale.
* Embedding (the slow part) runs before the write lock, on one dedicated thread, in small
  chunks: a search's query embedding waits for at most one chunk of a large ingest.

Scores: plain cosine, or -- once the collection holds enough Chinese and English cases --
language-centred cosine (server/cases/languages.py), so a Chinese query finds the English case
with its diagnosis.  ``scoring()`` says which.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import structlog
from medserve.accel.embeddings import Embedder
from medserve.server.cases.filters import CaseAttributes, Filters
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
from medserve.server.cases.store import CaseRecord, CaseStore, Written
from medserve.server.settings import CasesSettings

log = structlog.get_logger("medserve.cases")

DB_NAME = "cases.sqlite3"
_EMBED_CHUNK = 8


class CaseNotFound(Exception):
    pass


class ServiceStopping(Exception):
    pass


@dataclass(frozen=True)
class Match:
    record: CaseRecord
    score: float


class CaseService:
    def __init__(self, settings: CasesSettings, embedder: Embedder) -> None:
        self.settings = settings
        self.embedder = embedder
        self.directory = Path(settings.data_dir)
        cores = os.cpu_count() or 1
        self.params = IndexParams(
            dim=embedder.dim,
            m=settings.hnsw_m,
            ef_construction=settings.hnsw_ef_construction,
            threads=settings.build_threads or cores,
        )
        self.ef_search = settings.hnsw_ef_search
        self.ef_filtered = settings.hnsw_ef_filtered
        self.attrs = CaseAttributes()
        self.languages = CollectionLanguages(
            embedder.dim,
            min_texts=settings.language_min_texts,
            enabled=settings.language_centring,
        )
        self.store: CaseStore | None = None
        self.index: VectorIndex | None = None
        self.loaded = False
        self._write_lock = threading.Lock()
        self._snapshot_lock = threading.Lock()
        self._dirty = 0
        self._stopping = False
        self._embed_pool = ThreadPoolExecutor(1, thread_name_prefix="medserve-embed")

    # -- lifecycle (blocking; call from a worker thread) -----------------------------------

    def open(self) -> None:
        """Opens SQLite, then loads (and catches up) the index snapshot or rebuilds it."""
        started = time.perf_counter()
        # Owner-only: the database holds patient case text.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = CaseStore(
            self.directory / DB_NAME, embedder=self.embedder.name, dim=self.embedder.dim
        )
        self.store = store
        for rows in store.iter_filter_rows():
            self.attrs.load(rows)
        self._load_languages(store)
        try:
            index, snapshot_seq = VectorIndex.load(self.directory, self.params)
            replayed = self._catch_up(index, snapshot_seq)
            self.index = index
            log.info(
                "cases.index_loaded",
                cases=self.attrs.count,
                replayed=replayed,
                seconds=round(time.perf_counter() - started, 2),
            )
        except IndexUnusable as exc:
            # A fresh install has no snapshot; anything else deserves attention.
            level = log.warning if self.attrs.count else log.info
            level("cases.index_rebuild", reason=str(exc), cases=self.attrs.count)
            self.index = self._rebuild()
            replayed = self.attrs.count
            log.info(
                "cases.index_rebuilt",
                cases=self.attrs.count,
                seconds=round(time.perf_counter() - started, 2),
            )
        self._dirty = replayed
        self.loaded = True
        if replayed:
            self.snapshot()

    def _load_languages(self, store: CaseStore) -> None:
        """Fills languages missing from older rows, then sums every language's vectors."""
        started = time.perf_counter()
        filled = store.fill_languages(language_of)
        for labels, langs, vectors in store.iter_languages():
            known = [i for i, lang in enumerate(langs) if lang]
            self.languages.put(labels[known], vectors[known], [langs[i] for i in known])
        log.info(
            "cases.languages_loaded",
            filled=filled,
            scoring=self.scoring(),
            seconds=round(time.perf_counter() - started, 2),
            **self.languages.counts(),
        )

    def scoring(self) -> Scoring:
        return self.languages.scoring()

    def close(self) -> None:
        self._stopping = True
        self._embed_pool.shutdown(wait=True, cancel_futures=True)
        if self.loaded:
            self.snapshot()
        with self._write_lock:
            self.loaded = False
            if self.store is not None:
                self.store.close()
                self.store = None

    def snapshot(self) -> bool:
        """Saves the index if it changed since the last snapshot; True when one was written."""
        with self._snapshot_lock:
            started = time.perf_counter()
            with self._write_lock:
                if not self._dirty or self.index is None or self.store is None:
                    return False
                seq = self.store.current_seq()
                tmp = self.index.dump(self.directory, seq)
                pending, self._dirty = self._dirty, 0
            try:
                size = self.index.publish(self.directory, tmp, seq)
            except BaseException:
                with self._write_lock:
                    self._dirty += pending
                raise
        log.info(
            "cases.snapshot_saved",
            seq=seq,
            bytes=size,
            seconds=round(time.perf_counter() - started, 2),
        )
        return True

    def _catch_up(self, index: VectorIndex, snapshot_seq: int) -> int:
        """Brings a loaded snapshot up to the database; IndexUnusable if it cannot be trusted."""
        store = self._store()
        if store.current_seq() < snapshot_seq:
            raise IndexUnusable("snapshot is newer than the database")
        in_index = index.labels()
        live = store.labels()
        # Labels deleted before the snapshot are still listed (marked deleted): only count the
        # ones this call actually hides.
        hidden = sum(index.mark_deleted(int(label)) for label in np.setdiff1d(in_index, live))
        missing = np.setdiff1d(live, in_index)
        replayed: list[np.ndarray] = []
        for labels, vectors in store.iter_vectors(after_seq=snapshot_seq):
            index.add(vectors, labels, existing=np.isin(labels, in_index))
            replayed.append(labels)
        done = np.concatenate(replayed) if replayed else np.empty(0, dtype=np.int64)
        if not np.isin(missing, done).all():
            # Rows older than the snapshot but absent from it: the database was restored or
            # swapped underneath.  Only a rebuild is trustworthy.
            raise IndexUnusable("snapshot lacks cases that predate it")
        return len(done) + hidden

    def _rebuild(self) -> VectorIndex:
        store = self._store()
        count = store.count()
        index = VectorIndex.create(
            self.params, capacity=max(self.settings.initial_capacity, count + count // 8)
        )
        for labels, vectors in store.iter_vectors():
            if self._stopping:
                raise ServiceStopping("stopped during the index rebuild")
            # Nothing searches yet: whole batches per lock hold, every core.
            index.add(
                vectors, labels, existing=np.zeros(len(labels), dtype=bool), slice_rows=len(labels)
            )
        return index

    # -- embedding --------------------------------------------------------------------------

    async def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return await self._embed(texts, self.embedder.embed_queries)

    async def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return await self._embed(texts, self.embedder.embed_passages)

    async def count_tokens(self, texts: Sequence[str]) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._embed_pool, self.embedder.count_tokens, texts)

    async def _embed(self, texts: Sequence[str], fn: object) -> np.ndarray:
        loop = asyncio.get_running_loop()
        parts = []
        for start in range(0, len(texts), _EMBED_CHUNK):
            chunk = list(texts[start : start + _EMBED_CHUNK])
            parts.append(await loop.run_in_executor(self._embed_pool, fn, chunk))
        if not parts:
            return np.empty((0, self.embedder.dim), dtype=np.float32)
        return np.concatenate(parts)

    # -- cases ------------------------------------------------------------------------------

    async def upsert(self, records: Sequence[CaseRecord]) -> list[Written]:
        vectors = await self.embed_passages([r.text for r in records])
        return await asyncio.to_thread(self.upsert_embedded, records, vectors)

    def upsert_embedded(self, records: Sequence[CaseRecord], vectors: np.ndarray) -> list[Written]:
        """Stores cases whose passage vectors are already computed (blocking)."""
        if len({r.case_id for r in records}) != len(records):
            raise ValueError("a batch must not name the same case twice")
        store, index = self._store(), self._index()
        langs = [language_of(r.text) for r in records]
        with self._write_lock:
            written = store.upsert(records, vectors, langs)
            # Committed: from here on the cases survive a crash even if the lines below do not
            # run (start-up replays them from SQLite).
            labels = np.fromiter((w.label for w in written), dtype=np.int64, count=len(written))
            existing = np.fromiter((not w.created for w in written), dtype=bool, count=len(written))
            for label in labels[existing]:
                # An update: its old vector leaves the language sums before the new one enters.
                old = index.vector(int(label))
                if old is not None:
                    self.languages.remove(int(label), old)
            try:
                index.add(vectors, labels, existing=existing)
            except Exception:
                # Stored but not searchable until the next start replays it from SQLite.
                log.error("cases.index_update_failed", cases=len(written))
                raise
            self.languages.put(labels, vectors, langs)
            for record, w in zip(records, written, strict=True):
                self.attrs.put(replace(record, label=w.label), w.previous_icd10)
            self._dirty += len(written)
        return written

    async def get(self, case_id: str) -> CaseRecord | None:
        return await asyncio.to_thread(self._store().get, case_id)

    async def delete(self, case_id: str) -> bool:
        return await asyncio.to_thread(self.delete_sync, case_id)

    def delete_sync(self, case_id: str) -> bool:
        store, index = self._store(), self._index()
        with self._write_lock:
            record = store.get(case_id)
            if record is None:
                return False
            vector = index.vector(record.label)
            # Hide it from searches first, so none returns it after the delete is acknowledged.
            index.mark_deleted(record.label)
            self.attrs.remove(record.label, record.icd10)
            try:
                store.delete(case_id)
            except BaseException:
                index.unmark_deleted(record.label)
                self.attrs.put(record)
                raise
            if vector is not None:
                self.languages.remove(record.label, vector)
            self._dirty += 1
        return True

    async def search(
        self,
        *,
        k: int,
        text: str | None = None,
        case_id: str | None = None,
        filters: Filters | None = None,
    ) -> list[Match]:
        """Nearest cases to a text (embedded as a query) or to a stored case (itself excluded)."""
        exclude = None
        if case_id is not None:
            vector, exclude = await asyncio.to_thread(self._case_vector, case_id)
            lang = self.languages.language(exclude)
        else:
            vector = (await self.embed_queries([text or ""]))[0]
            lang = language_of(text or "")
        return await asyncio.to_thread(self.search_vector, vector, k, filters, exclude, lang)

    def search_vector(
        self,
        vector: np.ndarray,
        k: int,
        filters: Filters | None = None,
        exclude: int | None = None,
        language: str | None = None,
    ) -> list[Match]:
        """``language`` is the query's: with it, scores are language-centred when the
        collection is ready for that (see ``scoring``); without it, plain cosines."""
        vector = np.asarray(vector, dtype=np.float32)
        debias = self.languages.debias() if language else None
        if debias is None:
            hits = self._search_hits(vector, k, filters, exclude)
        else:
            hits = centred_search(
                debias,
                vector,
                language or "",
                k,
                lambda query, n: self._search_hits(query, n, filters, exclude),
                # SQLite reads vectors faster than hnswlib's get_items (~8 vs ~50 us each).
                self._store().vectors,
                self.languages,
            )
        records = self._store().get_labels([h.label for h in hits])
        return [Match(records[h.label], h.score) for h in hits if h.label in records]

    def _search_hits(
        self, vector: np.ndarray, k: int, filters: Filters | None, exclude: int | None
    ) -> list[Hit]:
        index = self._index()
        if filters is None or filters.is_empty():
            want = min(k, self.attrs.count - (exclude is not None))
            if want <= 0:
                return []
            try:
                return index.search(
                    vector, want, ef=self.ef_search, exclude=exclude, candidates=self.attrs.count
                )
            except SearchIncomplete:
                # Rare (a region crowded with deleted cases): fall through to the live mask.
                allowed = self.attrs.live_mask()
        else:
            allowed = self.attrs.mask(filters)
        if exclude is not None and exclude < len(allowed):
            allowed[exclude] = False
        matching = int(allowed.sum())
        want = min(k, matching)
        if want == 0:
            return []
        if matching <= self._exact_limit():
            return self._exact(vector, np.flatnonzero(allowed), want)
        try:
            return index.search(
                vector, want, ef=self.ef_filtered, allowed=allowed, candidates=matching
            )
        except SearchIncomplete:
            return self._exact(vector, np.flatnonzero(allowed), want)

    def _exact_limit(self) -> int:
        """Largest match count scored exactly rather than by a filtered graph walk.

        A walk under a filter matching m of n cases expands about ef*n/m nodes, ~9 us each at a
        million cases (distances to its neighbours plus Python predicate calls); exact scoring
        reads m vectors from SQLite at ~8 us each.  Measured in benchmarks/RESULTS.md; they
        cost the same near m = sqrt(ef*n): ~8,000 for a million cases at ef 64.
        """
        balance = math.isqrt(self.ef_filtered * max(self.attrs.count, 1))
        return min(self.settings.exact_search_max, max(256, balance))

    def _exact(self, vector: np.ndarray, labels: np.ndarray, k: int) -> list[Hit]:
        labels, matrix = self._store().vectors(labels)
        if len(labels) == 0:
            return []
        norms = np.linalg.norm(matrix, axis=1)
        query = vector / max(float(np.linalg.norm(vector)), 1e-12)
        scores = (matrix @ query) / np.maximum(norms, 1e-12)
        k = min(k, len(labels))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(int(labels[i]), float(scores[i])) for i in top]

    def _case_vector(self, case_id: str) -> tuple[np.ndarray, int]:
        record = self._store().get(case_id)
        if record is None:
            raise CaseNotFound(case_id)
        vector = self._index().vector(record.label)
        if vector is None:
            # Committed but not yet in the index (a write in flight): SQLite has it too.
            vector = self._store().vector(record.label)
        if vector is None:
            raise CaseNotFound(case_id)
        return vector, record.label

    def _store(self) -> CaseStore:
        if self.store is None:
            raise ServiceStopping("case store is closed")
        return self.store

    def _index(self) -> VectorIndex:
        if self.index is None:
            raise ServiceStopping("case index is not loaded")
        return self.index
