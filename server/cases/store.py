"""Cases in SQLite: the durable source of truth, vectors included.

WAL mode with ``synchronous=FULL``: a commit is on disk before the client is told "ok", so an
acknowledged case survives kill -9 and power loss.  The embedding is stored beside the case so
the hnswlib index can be rebuilt without re-running the model (re-embedding a million cases
would take hours).

Every write bumps a persistent counter ``seq`` and stamps the row with it.  An index snapshot
records the seq it reflects; at start-up rows with a larger seq are replayed into it.  The
counter lives in ``meta`` rather than being MAX(seq): deleting the newest row must not let the
next write reuse a seq that a snapshot already claims.

``lang`` (the language of ``text``, for language-centred scoring: server/cases/languages.py)
was added after the first release.  It is NULL in rows written before that -- or by an older
medserve after a rollback, which does not know the column -- and ``CaseStore`` fills every NULL
at open, so either direction of an upgrade keeps working.

Labels (the integer the index knows a case by) are AUTOINCREMENT rowids: stable across updates
of a case and never reused after a delete, so a stale index entry can never alias a new case.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from medserve.server.errors import APIError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    label          INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id        TEXT NOT NULL UNIQUE,
    seq            INTEGER NOT NULL,
    text           TEXT NOT NULL,
    department     TEXT,
    age            INTEGER,
    sex            TEXT,
    icd10          TEXT NOT NULL,
    admission_date TEXT,
    discharge_date TEXT,
    embedding      BLOB NOT NULL,
    lang           TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_seq ON cases(seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = (
    "label, case_id, seq, text, department, age, sex, icd10, admission_date, discharge_date, "
    "created_at, updated_at"
)


class StoreError(Exception):
    """The database cannot be used as is (wrong embedder, newer schema, unreadable)."""


class StorageFull(APIError):
    """The disk (or quota) is full: the write was rolled back, nothing earlier is lost.

    An APIError so that it leaves as 507 in the OpenAI error shape wherever it is raised;
    hospital IT sees it in the access log as status 507, the integration can retry later.
    """

    def __init__(self) -> None:
        super().__init__(
            507,
            "the case database's disk is full; this write was not stored (cases stored "
            "before are intact); free space under cases.data_dir and retry",
            code="insufficient_storage",
        )


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextlib.contextmanager
def _full_disk_as_507() -> Iterator[None]:
    """SQLite reports a full disk as SQLITE_FULL ("database or disk is full") and a write cut
    short by a file-size limit as an I/O error; the OS says ENOSPC / EDQUOT / EFBIG."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            raise StorageFull() from None
        raise
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            raise StorageFull() from None
        raise


@dataclass(frozen=True)
class CaseRecord:
    """One case as stored; ``label`` is 0 for a record not yet written."""

    case_id: str
    text: str
    department: str | None = None
    age: int | None = None
    sex: str | None = None
    icd10: tuple[str, ...] = ()
    admission_date: dt.date | None = None
    discharge_date: dt.date | None = None
    label: int = 0
    seq: int = 0
    created_at: int = 0
    updated_at: int = 0


@dataclass(frozen=True)
class Written:
    label: int
    created: bool
    previous_icd10: tuple[str, ...] = ()
    """The codes the row had before an update (the filter index must forget them)."""


@dataclass(frozen=True)
class VectorDBMeta:
    """What a database of embedded texts must match to be opened (see open_vector_db)."""

    kind: str
    """"case", "knowledge": names the database in errors."""
    schema_version: int
    embedder: str
    dim: int
    data_dir_setting: str
    remedy: str
    """What else the operator can do about vectors of another embedder."""


def open_vector_db(
    path: Path, schema: str, meta: VectorDBMeta, *pragmas: str
) -> sqlite3.Connection:
    """A connection to a durable store of embedded texts (cases, knowledge passages).

    WAL with synchronous=FULL: a commit is on disk when it returns, which is when the API
    acknowledges a write.  Refuses a newer schema, and vectors of another embedder: they are
    not comparable with new ones, and refusing is safer than silently mixing them in one index.
    """
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        for pragma in ("journal_mode=WAL", "synchronous=FULL", *pragmas, "busy_timeout=5000"):
            db.execute(f"PRAGMA {pragma}")
        db.executescript(schema)
        _check_meta(db, path, meta)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"{meta.kind} database {path} cannot be opened: {exc}") from None
    except StoreError:
        db.close()
        raise
    return db


def _check_meta(db: sqlite3.Connection, path: Path, meta: VectorDBMeta) -> None:
    stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if "schema" in stored and int(stored["schema"]) > meta.schema_version:
        raise StoreError(
            f"{meta.kind} database {path} has schema {stored['schema']}, newer than this "
            f"medserve understands ({meta.schema_version}); upgrade medserve"
        )
    embedder = stored.get("embedder")
    if embedder is not None and (
        embedder != meta.embedder or int(stored.get("dim", 0)) != meta.dim
    ):
        raise StoreError(
            f"{meta.kind} database {path} holds {stored.get('dim')}-d vectors from embedder "
            f"{embedder!r}, but this server embeds with {meta.embedder!r} ({meta.dim}-d); point "
            f"{meta.data_dir_setting} elsewhere or {meta.remedy}"
        )
    with _Transaction(db):
        for key, value in (
            ("schema", meta.schema_version),
            ("embedder", meta.embedder),
            ("dim", meta.dim),
        ):
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))


class CaseStore:
    """Thread-safe: one connection, one lock.  Statements are short; vectors come precomputed."""

    def __init__(self, path: Path, *, embedder: str, dim: int) -> None:
        self.path = path
        self.dim = dim
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = open_vector_db(
            path,
            _SCHEMA,
            VectorDBMeta(
                "case", SCHEMA_VERSION, embedder, dim, "cases.data_dir", "re-import the cases"
            ),
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(cases)")}
        if "lang" not in columns:
            # A database from before the column; fill_languages sets the values.
            self._db.execute("ALTER TABLE cases ADD COLUMN lang TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes ---------------------------------------------------------------------------

    def upsert(
        self,
        records: Sequence[CaseRecord],
        vectors: np.ndarray,
        languages: Sequence[str | None] | None = None,
    ) -> list[Written]:
        """Insert or replace cases (by case_id) in one transaction; returns their labels.
        A language left None is filled in by ``fill_languages`` at the next open."""
        if languages is None:
            languages = [None] * len(records)
        if not len(records) == len(vectors) == len(languages):
            raise ValueError("one vector and one language per record")
        blobs = [self._blob(v) for v in vectors]
        now = int(time.time())
        out: list[Written] = []
        with _full_disk_as_507(), self._lock, self._transaction():
            seq = self._next_seq(len(records))
            for record, blob, lang in zip(records, blobs, languages, strict=True):
                seq += 1
                row = self._db.execute(
                    "SELECT label, icd10 FROM cases WHERE case_id = ?", (record.case_id,)
                ).fetchone()
                values = (
                    seq,
                    record.text,
                    record.department,
                    record.age,
                    record.sex,
                    json.dumps(list(record.icd10)),
                    _date_text(record.admission_date),
                    _date_text(record.discharge_date),
                    blob,
                    lang,
                    now,
                )
                if row is None:
                    cursor = self._db.execute(
                        "INSERT INTO cases (seq, text, department, age, sex, icd10, "
                        "admission_date, discharge_date, embedding, lang, updated_at, case_id, "
                        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*values, record.case_id, now),
                    )
                    out.append(Written(int(cursor.lastrowid or 0), created=True))
                else:
                    self._db.execute(
                        "UPDATE cases SET seq = ?, text = ?, department = ?, age = ?, sex = ?, "
                        "icd10 = ?, admission_date = ?, discharge_date = ?, embedding = ?, "
                        "lang = ?, updated_at = ? WHERE label = ?",
                        (*values, row[0]),
                    )
                    out.append(Written(int(row[0]), False, tuple(json.loads(row[1]))))
        return out

    def delete(self, case_id: str) -> CaseRecord | None:
        """Removes a case; returns what was removed, or None when there was no such case."""
        with _full_disk_as_507(), self._lock, self._transaction():
            # fetchall: a RETURNING statement left half-read would block the COMMIT.
            rows = self._db.execute(
                f"DELETE FROM cases WHERE case_id = ? RETURNING {_COLUMNS}", (case_id,)
            ).fetchall()
        return _record(rows[0]) if rows else None

    # -- reads ----------------------------------------------------------------------------

    def get(self, case_id: str) -> CaseRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM cases WHERE case_id = ?", (case_id,)
            ).fetchone()
        return None if row is None else _record(row)

    def get_labels(self, labels: Sequence[int]) -> dict[int, CaseRecord]:
        """Records by label; labels without a row (deleted meanwhile) are simply absent."""
        if not labels:
            return {}
        marks = ",".join("?" * len(labels))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM cases WHERE label IN ({marks})", [int(x) for x in labels]
            ).fetchall()
        return {int(r[0]): _record(r) for r in rows}

    def vector(self, label: int) -> np.ndarray | None:
        with self._lock:
            row = self._db.execute(
                "SELECT embedding FROM cases WHERE label = ?", (label,)
            ).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype="<f4").astype(np.float32)

    def vectors(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels found, their vectors) -- rows deleted meanwhile are simply absent."""
        found: list[np.ndarray] = []
        blobs: list[bytes] = []
        for lo in range(0, len(labels), 10_000):
            chunk = [int(x) for x in labels[lo : lo + 10_000]]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(
                    f"SELECT label, embedding FROM cases WHERE label IN ({marks})", chunk
                ).fetchall()
            found.append(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
            blobs.extend(r[1] for r in rows)
        matrix = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self.dim)
        return (np.concatenate(found) if found else np.empty(0, np.int64)), matrix.astype(
            np.float32
        )

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM cases").fetchone()[0])

    def current_seq(self) -> int:
        with self._lock:
            return self._read_seq()

    def labels(self) -> np.ndarray:
        with self._lock:
            rows = self._db.execute("SELECT label FROM cases").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def iter_filter_rows(self, batch: int = 50_000) -> Iterator[list[tuple]]:
        """(label, department, age, sex, icd10 JSON, admission_date) of every case, in batches:
        what the in-memory filter columns are rebuilt from at start-up."""
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT label, department, age, sex, icd10, admission_date FROM cases "
                    "WHERE label > ? ORDER BY label LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            last = int(rows[-1][0])
            yield rows

    def fill_languages(self, detect: Callable[[str], str], batch: int = 2_000) -> int:
        """Sets ``lang`` where it is NULL (rows from before the column, or from an older
        medserve); returns how many rows it set.  Short transactions: writers interleave."""
        done = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT label, text FROM cases WHERE lang IS NULL LIMIT ?", (batch,)
                ).fetchall()
            if not rows:
                return done
            values = [(detect(text), label) for label, text in rows]
            with _full_disk_as_507(), self._lock, self._transaction():
                self._db.executemany(
                    "UPDATE cases SET lang = ? WHERE label = ? AND lang IS NULL", values
                )
            done += len(values)

    def iter_languages(
        self, batch: int = 10_000
    ) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        """(labels, languages, vectors) of every case, a batch at a time (for the means)."""
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT label, lang, embedding FROM cases WHERE label > ? "
                    "ORDER BY label LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            last = int(rows[-1][0])
            labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4")
            langs = [r[1] or "" for r in rows]
            yield labels, langs, vectors.reshape(len(rows), self.dim).astype(np.float32)

    def iter_vectors(
        self, *, after_seq: int = 0, batch: int = 10_000
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(labels, vectors) of rows written after ``after_seq``, a batch at a time."""
        last_label = 0
        while True:
            # Keyset pagination on label: stable while writers append (labels only grow).
            with self._lock:
                rows = self._db.execute(
                    "SELECT label, embedding FROM cases WHERE label > ? AND seq > ? "
                    "ORDER BY label LIMIT ?",
                    (last_label, after_seq, batch),
                ).fetchall()
            if not rows:
                return
            last_label = int(rows[-1][0])
            labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4")
            yield labels, vectors.reshape(len(rows), self.dim).astype(np.float32)

    # -- internals ------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _read_seq(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        return int(row[0]) if row else 0

    def _next_seq(self, n: int) -> int:
        """Reserves n sequence numbers inside the caller's transaction; returns the last used."""
        current = self._read_seq()
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('seq', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(current + n),),
        )
        return current

    def _blob(self, vector: np.ndarray) -> bytes:
        v = np.asarray(vector, dtype="<f4").reshape(-1)
        if v.shape[0] != self.dim:
            raise ValueError(f"vector has {v.shape[0]} dimensions, expected {self.dim}")
        return v.tobytes()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")  # in WAL mode the pages hit the disk here
                return
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (it does on SQLITE_FULL).
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


def _date_text(value: dt.date | None) -> str | None:
    return None if value is None else value.isoformat()


def _record(row: tuple) -> CaseRecord:
    (label, case_id, seq, text, department, age, sex, icd10, adm, dis, created, updated) = row
    return CaseRecord(
        case_id=case_id,
        text=text,
        department=department,
        age=age,
        sex=sex,
        icd10=tuple(json.loads(icd10)),
        admission_date=None if adm is None else dt.date.fromisoformat(adm),
        discharge_date=None if dis is None else dt.date.fromisoformat(dis),
        label=int(label),
        seq=int(seq),
        created_at=int(created),
        updated_at=int(updated),
    )
