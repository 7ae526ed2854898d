"""SQLite, the knowledge base's source of truth: documents, their passages and vectors.

Same durability as the case store (WAL, synchronous=FULL, one BEGIN IMMEDIATE transaction per
write, acknowledged after COMMIT); the hnswlib index is derived from the ``chunks`` table.
A chunk's ``label`` is its hnswlib label; ``meta.seq`` counts writes so a saved index snapshot
can be matched against the database it was taken from.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from medserve.server.cases.store import (
    VectorDBMeta,
    _full_disk_as_507,
    _Transaction,
    open_vector_db,
)
from medserve.server.knowledge.chunking import Chunk

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    source TEXT,
    language TEXT,
    format TEXT NOT NULL,
    text TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    label INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    chunk INTEGER NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id);
"""


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    source: str | None
    language: str | None
    format: str
    text: str
    created_at: int
    chunks: int = 0


@dataclass(frozen=True)
class Passage:
    label: int
    document_id: str
    title: str
    chunk: int
    start: int
    end: int
    text: str


class KnowledgeStore:
    """Thread-safe: one connection, one lock."""

    def __init__(self, path: Path, *, embedder: str, dim: int) -> None:
        self.path = path
        self.dim = dim
        self._lock = threading.Lock()
        meta = VectorDBMeta(
            "knowledge", SCHEMA_VERSION, embedder, dim, "knowledge.data_dir", "delete its documents"
        )
        self._db = open_vector_db(path, _SCHEMA, meta, "foreign_keys=ON")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes ---------------------------------------------------------------------------

    def add(
        self,
        *,
        title: str,
        source: str | None,
        language: str | None,
        fmt: str,
        text: str,
        chunks: Sequence[Chunk],
        vectors: np.ndarray,
    ) -> tuple[Document, np.ndarray]:
        """Stores a document and its passages in one transaction; returns it and their labels."""
        if len(chunks) != len(vectors):
            raise ValueError("one vector per chunk")
        doc = Document(
            id=f"doc-{uuid.uuid4().hex[:16]}",
            title=title,
            source=source,
            language=language,
            format=fmt,
            text=text,
            created_at=int(time.time()),
            chunks=len(chunks),
        )
        labels: list[int] = []
        with _full_disk_as_507(), self._lock, _Transaction(self._db):
            self._bump_seq()
            self._db.execute(
                "INSERT INTO documents (id, title, source, language, format, text, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (doc.id, title, source, language, fmt, text, doc.created_at),
            )
            for n, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True)):
                cursor = self._db.execute(
                    'INSERT INTO chunks (document_id, chunk, start, "end", embedding) '
                    "VALUES (?, ?, ?, ?, ?)",
                    (doc.id, n, chunk.start, chunk.end, self._blob(vector)),
                )
                labels.append(int(cursor.lastrowid or 0))
        return doc, np.asarray(labels, dtype=np.int64)

    def delete(self, document_id: str) -> np.ndarray | None:
        """Removes a document and its passages; their labels, or None if there was none."""
        with _full_disk_as_507(), self._lock, _Transaction(self._db):
            rows = self._db.execute(
                "SELECT label FROM chunks WHERE document_id = ?", (document_id,)
            ).fetchall()
            gone = self._db.execute(
                "DELETE FROM documents WHERE id = ? RETURNING id", (document_id,)
            ).fetchall()
            if not gone:
                return None
            self._bump_seq()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    # -- reads ----------------------------------------------------------------------------

    def get(self, document_id: str) -> Document | None:
        with self._lock:
            row = self._db.execute(
                "SELECT d.id, d.title, d.source, d.language, d.format, d.text, d.created_at, "
                "(SELECT COUNT(*) FROM chunks c WHERE c.document_id = d.id) "
                "FROM documents d WHERE d.id = ?",
                (document_id,),
            ).fetchone()
        return None if row is None else Document(*row)

    def list(self) -> list[Document]:
        """Every document without its text (the listing names them, it does not ship them)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT d.id, d.title, d.source, d.language, d.format, '', d.created_at, "
                "(SELECT COUNT(*) FROM chunks c WHERE c.document_id = d.id) "
                "FROM documents d ORDER BY d.created_at, d.id"
            ).fetchall()
        return [Document(*r) for r in rows]

    def passages(self, labels: Sequence[int]) -> dict[int, Passage]:
        """Passages by label, their text cut from the stored document; deleted ones absent."""
        if not labels:
            return {}
        marks = ",".join("?" * len(labels))
        with self._lock:
            rows = self._db.execute(
                f'SELECT c.label, c.document_id, d.title, c.chunk, c.start, c."end", '
                f'substr(d.text, c.start + 1, c."end" - c.start) FROM chunks c '
                f"JOIN documents d ON d.id = c.document_id WHERE c.label IN ({marks})",
                [int(x) for x in labels],
            ).fetchall()
        return {int(r[0]): Passage(*r) for r in rows}

    def count_chunks(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def current_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        return int(row[0]) if row else 0

    def labels(self) -> np.ndarray:
        with self._lock:
            rows = self._db.execute("SELECT label FROM chunks").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def iter_passage_texts(
        self, batch: int = 2_000
    ) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        """(labels, passage texts, vectors) of every passage, a batch at a time."""
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    'SELECT c.label, substr(d.text, c.start + 1, c."end" - c.start), c.embedding '
                    "FROM chunks c JOIN documents d ON d.id = c.document_id "
                    "WHERE c.label > ? ORDER BY c.label LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            last = int(rows[-1][0])
            labels = np.asarray([r[0] for r in rows], dtype=np.int64)
            vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4")
            yield (
                labels,
                [r[1] for r in rows],
                vectors.reshape(len(rows), self.dim).astype(np.float32),
            )

    # -- internals ------------------------------------------------------------------------

    def _bump_seq(self) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('seq', '1') "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )

    def _blob(self, vector: np.ndarray) -> bytes:
        v = np.asarray(vector, dtype="<f4").reshape(-1)
        if v.shape[0] != self.dim:
            raise ValueError(f"vector has {v.shape[0]} dimensions, expected {self.dim}")
        return v.tobytes()
