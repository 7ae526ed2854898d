"""The hnswlib index: a derived, disposable copy of the vectors in SQLite.

Snapshot protocol (crash-safe without ever trusting a half-written file):

1. ``dump`` writes the graph to ``index-<seq>-<nonce>.hnsw.tmp`` (caller blocks writers
   meanwhile, so the file is exactly the database at ``seq``; searches continue).  The nonce
   keeps a new snapshot from ever overwriting the file the current manifest names.
2. ``publish`` checksums it, fsyncs, renames it to ``index-<seq>-<nonce>.hnsw``, then atomically
   replaces ``index.json`` (the manifest: file name, sha256, size, seq, parameters), fsyncs the
   directory and removes older snapshots.

The manifest only ever names a complete, fsynced file, so a crash at any step leaves either the
old snapshot or the new one.  ``load`` verifies size and sha256 *before* handing the file to
hnswlib, whose loader trusts its input and can crash the process on a corrupt file.

Thread safety: hnswlib allows concurrent searches, but not a search concurrent with an insert
(its maintainer, nmslib/hnswlib#562; seen here as a walk returning too few results).  So
searches and ``dump`` share a read lock, and every mutation takes the write lock -- inserts in
slices of 16 vectors, so a search waits milliseconds, not a whole batch.  The caller
serialises mutations among themselves and with ``dump``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np
from medserve.server.durable import fsync_dir

MANIFEST = "index.json"
_FORMAT = 1


class IndexUnusable(Exception):
    """No trustworthy snapshot on disk; the message says why (for the log, no case data)."""


class SearchIncomplete(Exception):
    """The graph walk found fewer results than asked (heavily deleted or filtered region)."""


@dataclass(frozen=True)
class IndexParams:
    dim: int
    m: int = 24
    ef_construction: int = 200
    threads: int = 2
    """Threads for batch inserts (a single insert always uses one)."""
    slice_rows: int = 16
    """Vectors inserted per hold of the write lock; searches run between slices."""


@dataclass(frozen=True)
class Hit:
    label: int
    score: float
    """Cosine similarity, 1.0 for identical direction."""


class RWLock:
    """Searches share, inserts exclude.  Fair both ways: a waiting writer holds back new readers,
    and the readers that queued during a write go before the next one -- so a search waits for
    at most one slice of an ingest, however long the ingest."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._readers_waiting = 0
        self._writers_waiting = 0
        self._admit = 0
        """Readers let in ahead of waiting writers once the current write ends."""

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._readers_waiting += 1
            while self._writer or (self._writers_waiting and not self._admit):
                self._cond.wait()
            self._readers_waiting -= 1
            self._admit = max(0, self._admit - 1)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers or self._admit:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._admit = self._readers_waiting
                self._cond.notify_all()


class VectorIndex:
    def __init__(self, params: IndexParams, index: hnswlib.Index) -> None:
        self.params = params
        self._index = index
        # hnswlib's beam is max(ef, k) with one index-wide ef; keeping that ef at 1 lets each
        # search choose its own beam through k (see ``search``) without racing other searches.
        self._index.set_ef(1)
        self._lock = RWLock()

    @classmethod
    def create(cls, params: IndexParams, capacity: int) -> VectorIndex:
        index = hnswlib.Index(space="cosine", dim=params.dim)
        # allow_replace_deleted: new cases reuse the slots of deleted ones, so memory tracks the
        # live count instead of every case ever stored.
        index.init_index(
            max_elements=max(capacity, 1),
            M=params.m,
            ef_construction=params.ef_construction,
            random_seed=100,
            allow_replace_deleted=True,
        )
        return cls(params, index)

    @classmethod
    def load(cls, directory: Path, params: IndexParams) -> tuple[VectorIndex, int]:
        """The last published snapshot and the seq it reflects, or IndexUnusable."""
        manifest_path = directory / MANIFEST
        if not manifest_path.exists():
            raise IndexUnusable("no index snapshot")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            name, digest, size = manifest["file"], manifest["sha256"], int(manifest["size"])
            seq = int(manifest["seq"])
            if manifest.get("format") != _FORMAT or "/" in name or name.startswith("."):
                raise ValueError("unknown manifest format")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexUnusable(f"unreadable manifest ({type(exc).__name__})") from None
        wanted = {"dim": params.dim, "m": params.m, "ef_construction": params.ef_construction}
        found = {key: manifest.get(key) for key in wanted}
        if found != wanted:
            raise IndexUnusable(f"snapshot built with {found}, settings ask for {wanted}")
        path = directory / name
        try:
            actual_size = path.stat().st_size
        except OSError:
            raise IndexUnusable("snapshot file missing") from None
        if actual_size != size:
            raise IndexUnusable(f"snapshot size {actual_size} != {size} in the manifest")
        if _sha256(path) != digest:
            raise IndexUnusable("snapshot checksum mismatch")
        index = hnswlib.Index(space="cosine", dim=params.dim)
        try:
            index.load_index(str(path), max_elements=0, allow_replace_deleted=True)
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise IndexUnusable(
                f"hnswlib cannot load the snapshot ({type(exc).__name__})"
            ) from None
        return cls(params, index), seq

    # -- size -----------------------------------------------------------------------------

    @property
    def slots_used(self) -> int:
        """Slots holding a vector, deleted ones included (they are reused by later inserts)."""
        return int(self._index.get_current_count())

    @property
    def capacity(self) -> int:
        return int(self._index.get_max_elements())

    def labels(self) -> np.ndarray:
        """Every label in the graph, including ones marked deleted."""
        with self._lock.read():
            return np.asarray(self._index.get_ids_list(), dtype=np.int64)

    # -- mutations (caller serialises) ----------------------------------------------------

    def add(
        self,
        vectors: np.ndarray,
        labels: np.ndarray,
        *,
        existing: np.ndarray,
        slice_rows: int | None = None,
    ) -> None:
        """Inserts new labels and overwrites the vectors of ``existing`` ones (updates)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        existing = np.asarray(existing, dtype=bool)
        fresh = np.flatnonzero(~existing)
        self._ensure_capacity(len(fresh))
        step = slice_rows or self.params.slice_rows
        for lo in range(0, len(fresh), step):
            rows = fresh[lo : lo + step]
            with self._lock.write():
                # replace_deleted only for brand-new labels: for a label already in the graph
                # it would move the label to a vacant slot and leave the old slot live.
                self._index.add_items(
                    vectors[rows],
                    labels[rows],
                    num_threads=self.params.threads,
                    replace_deleted=True,
                )
        for row in np.flatnonzero(existing):
            with self._lock.write():
                self._update(vectors[row], int(labels[row]))

    def mark_deleted(self, label: int) -> bool:
        """False when the label is unknown or already deleted."""
        with self._lock.write():
            try:
                self._index.mark_deleted(int(label))
            except RuntimeError:
                return False
            return True

    def unmark_deleted(self, label: int) -> None:
        with self._lock.write(), contextlib.suppress(RuntimeError):
            self._index.unmark_deleted(int(label))

    def _update(self, vector: np.ndarray, label: int) -> None:
        try:
            self._index.add_items(vector[None, :], np.array([label]), num_threads=1)
        except RuntimeError:
            # A deleted slot cannot be updated while replacement is enabled: revive it first.
            self._index.unmark_deleted(label)
            self._index.add_items(vector[None, :], np.array([label]), num_threads=1)

    def _ensure_capacity(self, n_new: int) -> None:
        needed = self.slots_used + n_new
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        with self._lock.write():
            self._index.resize_index(new_capacity)

    # -- search ---------------------------------------------------------------------------

    def search(
        self,
        vector: np.ndarray,
        k: int,
        *,
        ef: int,
        allowed: np.ndarray | None = None,
        exclude: int | None = None,
        candidates: int | None = None,
    ) -> list[Hit]:
        """The k nearest live cases by graph walk with a beam of ``ef``.

        ``allowed`` is a boolean mask by label, applied inside the hnswlib walk (its filter
        callable), so k hits come back whenever k allowed cases are reachable -- a post-filter
        would return fewer.  ``candidates`` (how many cases could match) caps the beam, since
        hnswlib fails when it cannot fill it.  Raises SearchIncomplete when the walk finds
        fewer than k.
        """
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        predicate = None
        want = k + (exclude is not None)
        if allowed is not None:
            buffer, size = allowed.view(np.uint8).tobytes(), len(allowed)

            def predicate(label: int) -> bool:
                # Labels inserted after the mask was built lie beyond it: not allowed.
                return label < size and buffer[label] == 1 and label != exclude

            want = k
        # Asking for max(k, ef) results is a beam of ef for this query alone; the best k of
        # them are the answer.
        request = max(want, ef) if candidates is None else max(want, min(ef, candidates))
        try:
            hits = self._knn(query, request, predicate, keep=want)
        except SearchIncomplete:
            if request == want:
                raise
            hits = self._knn(query, want, predicate, keep=want)
        return [h for h in hits if h.label != exclude][:k]

    def vector(self, label: int) -> np.ndarray | None:
        """The stored unit vector of a live label, else None."""
        with self._lock.read():
            try:
                return np.asarray(self._index.get_items([int(label)]), dtype=np.float32)[0]
            except RuntimeError:
                return None

    def vectors(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels found, their unit vectors); labels deleted or unknown are left out."""
        found: list[int] = []
        rows: list[np.ndarray] = []
        with self._lock.read():
            try:  # one call for all: hnswlib refuses the batch if any label is gone
                matrix = np.asarray(self._index.get_items(labels.tolist()), dtype=np.float32)
                return np.asarray(labels, dtype=np.int64), matrix.reshape(-1, self.params.dim)
            except RuntimeError:
                pass
            for label in labels.tolist():
                try:
                    rows.append(np.asarray(self._index.get_items([label]), dtype=np.float32)[0])
                except RuntimeError:
                    continue
                found.append(label)
        matrix = np.stack(rows) if rows else np.empty((0, self.params.dim), dtype=np.float32)
        return np.asarray(found, dtype=np.int64), matrix

    def _knn(self, query: np.ndarray, k: int, predicate: object, *, keep: int) -> list[Hit]:
        """hnswlib's k nearest; only the best ``keep`` become Hit objects (they come sorted)."""
        with self._lock.read():
            try:
                labels, distances = self._index.knn_query(
                    query, k=k, num_threads=1, filter=predicate
                )  # one thread: the predicate is Python and needs the GIL anyway
            except RuntimeError as exc:
                # hnswlib raises when it finds fewer than k; nothing else in knn_query does.
                raise SearchIncomplete(str(exc)) from None
        labels, distances = labels[0, :keep].tolist(), distances[0, :keep].tolist()
        return [Hit(label, 1.0 - d) for label, d in zip(labels, distances, strict=True)]

    # -- snapshots ------------------------------------------------------------------------

    def dump(self, directory: Path, seq: int) -> Path:
        """Writes the graph to a temporary file; the caller keeps writers out meanwhile."""
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"index-{seq}-{uuid.uuid4().hex[:8]}.hnsw.tmp"
        with self._lock.read():
            self._index.save_index(str(tmp))
        return tmp

    def publish(self, directory: Path, tmp: Path, seq: int) -> int:
        """Makes a dumped file the current snapshot (see module docstring); returns its size."""
        final = tmp.with_suffix("")
        _fsync_file(tmp)
        size = tmp.stat().st_size
        digest = _sha256(tmp)
        os.replace(tmp, final)
        fsync_dir(directory)
        manifest = {
            "format": _FORMAT,
            "file": final.name,
            "sha256": digest,
            "size": size,
            "seq": seq,
            "dim": self.params.dim,
            "m": self.params.m,
            "ef_construction": self.params.ef_construction,
        }
        manifest_tmp = directory / (MANIFEST + ".tmp")
        with open(manifest_tmp, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(manifest_tmp, directory / MANIFEST)
        fsync_dir(directory)
        for old in directory.glob("index-*.hnsw*"):
            if old.name != final.name:
                with contextlib.suppress(OSError):
                    old.unlink()
        return size


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
