"""The SQLite case store: upsert/delete semantics, the seq counter recovery relies on, stable
labels, and durability of acknowledged writes across kill -9 of the writing process."""

from __future__ import annotations

import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from medserve.server.cases.store import CaseRecord, CaseStore, StoreError

DIM = 8


def _store(path: Path) -> CaseStore:
    return CaseStore(path / "cases.sqlite3", embedder="test-embedder", dim=DIM)


def _record(case_id: str, **fields: object) -> CaseRecord:
    return CaseRecord(case_id=case_id, text=fields.pop("text", f"text of {case_id}"), **fields)  # type: ignore[arg-type]


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def test_upsert_creates_then_updates_in_place(tmp_path: Path) -> None:
    store = _store(tmp_path)
    full = _record(
        "c1",
        department="Cardiology",
        age=61,
        sex="male",
        icd10=("I21.4", "E11"),
        admission_date=dt.date(2024, 3, 1),
        discharge_date=dt.date(2024, 3, 9),
    )
    [written] = store.upsert([full], _vectors(1))
    assert written.created and written.label > 0
    got = store.get("c1")
    assert got is not None
    assert (got.text, got.department, got.age, got.sex) == (full.text, "Cardiology", 61, "male")
    assert got.icd10 == ("I21.4", "E11")
    assert (got.admission_date, got.discharge_date) == (dt.date(2024, 3, 1), dt.date(2024, 3, 9))

    [again] = store.upsert([_record("c1", text="revised", icd10=("J18",))], _vectors(1, seed=1))
    assert not again.created
    assert again.label == written.label, "an update keeps the label the index knows"
    assert again.previous_icd10 == ("I21.4", "E11")
    updated = store.get("c1")
    assert updated is not None and updated.text == "revised" and updated.department is None
    assert updated.seq > got.seq
    assert updated.created_at == got.created_at
    assert store.count() == 1


def test_labels_are_never_reused_and_seq_never_goes_back(tmp_path: Path) -> None:
    store = _store(tmp_path)
    written = store.upsert([_record(f"c{i}") for i in range(3)], _vectors(3))
    newest = written[-1].label
    seq_before = store.current_seq()
    removed = store.delete("c2")
    assert removed is not None and removed.label == newest
    assert store.delete("c2") is None
    # Deleting the newest row must not let the next write reuse its label or its seq: a
    # snapshot taken before the delete already claims both.
    [fresh] = store.upsert([_record("c9")], _vectors(1))
    assert fresh.label > newest
    assert store.current_seq() == seq_before + 1


def test_vectors_round_trip_and_replay_after_seq(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = _vectors(5)
    store.upsert([_record(f"a{i}") for i in range(5)], first)
    mark = store.current_seq()
    second = _vectors(3, seed=7)
    written = store.upsert([_record(f"b{i}") for i in range(3)], second)

    replay = list(store.iter_vectors(after_seq=mark, batch=2))
    labels = np.concatenate([labels for labels, _ in replay])
    vectors = np.concatenate([vectors for _, vectors in replay])
    assert labels.tolist() == [w.label for w in written]
    np.testing.assert_array_equal(vectors, second)

    all_labels, all_vectors = store.vectors(np.array([1, 2, 999, written[0].label]))
    assert all_labels.tolist() == [1, 2, written[0].label], "missing labels are skipped"
    np.testing.assert_array_equal(all_vectors[0], first[0])
    assert store.vector(999) is None


def test_filter_rows_iterate_in_label_order(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.upsert([_record(f"c{i}", age=i, icd10=("E11",)) for i in range(25)], _vectors(25))
    batches = list(store.iter_filter_rows(batch=10))
    assert [len(b) for b in batches] == [10, 10, 5]
    rows = [r for b in batches for r in b]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert rows[3][1:] == (None, 3, None, '["E11"]', None)


def test_reopen_keeps_everything_and_checks_the_embedder(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.upsert([_record("c1")], _vectors(1))
    store.close()
    reopened = _store(tmp_path)
    assert reopened.get("c1") is not None
    reopened.close()
    with pytest.raises(StoreError, match="embedder"):
        CaseStore(tmp_path / "cases.sqlite3", embedder="other-model", dim=DIM)
    with pytest.raises(StoreError, match="16-d"):
        CaseStore(tmp_path / "cases.sqlite3", embedder="test-embedder", dim=16)


def test_durability_settings(tmp_path: Path) -> None:
    store = _store(tmp_path)
    db = store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2, "FULL: fsync at each commit"


def test_a_failed_batch_writes_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    bad = np.zeros((2, DIM + 1), dtype=np.float32)
    with pytest.raises(ValueError):
        store.upsert([_record("x1"), _record("x2")], bad)
    assert store.count() == 0 and store.current_seq() == 0


def test_unreadable_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "cases.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot be opened"):
        _store(tmp_path)


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from pathlib import Path
    from medserve.server.cases.store import CaseRecord, CaseStore
    store = CaseStore(Path(sys.argv[1]), embedder="test-embedder", dim=8)
    i = 0
    while True:
        ids = [f"k{i + j}" for j in range(4)]
        store.upsert([CaseRecord(case_id=c, text="t") for c in ids], np.ones((4, 8), np.float32))
        print(*ids, flush=True)  # acknowledged only after the commit returned
        i += 4
    """
)


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    db_path = tmp_path / "cases.sqlite3"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    acked: list[str] = []
    deadline = time.monotonic() + 30
    assert writer.stdout is not None
    while len(acked) < 400 and time.monotonic() < deadline:
        acked.extend(writer.stdout.readline().split())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(10)
    assert len(acked) >= 400

    db = sqlite3.connect(db_path)
    stored = {row[0] for row in db.execute("SELECT case_id FROM cases")}
    assert set(acked) <= stored
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
