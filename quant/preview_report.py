"""The preview's one table (terminal and Markdown), its JSON document and its PNG chart.

Terminal and Markdown come from the same cells and the benchmark's own renderers
(benchmarks/tables.py), so what is pasted into RESULTS.md is what was seen; the chart is the
benchmark's tokens/s and ITL chart (benchmarks/chart.py) with one bar per candidate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medserve.benchmarks.results import Row
from medserve.benchmarks.tables import render_markdown, render_text
from medserve.quant.preview_measure import Measurement, MeasurePlan
from medserve.quant.preview_verdict import GIB, Thresholds, Verdict

SCHEMA = "medserve-quantize-preview/1"
MIB = 1 << 20


@dataclass
class CandidateResult:
    name: str
    engine: str
    precision: str
    status: str
    """"measured", "skipped" (engine not installed) or "error" (build or run failed)."""
    message: str = ""
    reused: bool = False
    """Built by an earlier preview into the same --work-dir, from the same source."""
    build_s: float = 0.0
    size_bytes: int | None = None
    perplexity: float = math.nan
    ppl_increase: float = math.nan
    load_average: float | None = None
    """1-minute load average just before this candidate was measured (shared machine)."""
    measurement: Measurement | None = None
    verdict: Verdict | None = None
    folder: Path | None = field(default=None, repr=False)

    def verdict_word(self) -> str:
        if self.status != "measured" or self.verdict is None:
            return self.status
        return "pass" if self.verdict.passed else "FAIL"

    def reason(self) -> str:
        if self.verdict is not None:
            return "; ".join(self.verdict.reasons)
        return self.message.splitlines()[0] if self.message else ""


@dataclass(frozen=True)
class Reference:
    label: str
    """What the reference is, for the table: "OpenVINO fp16 (built from the source)"."""
    folder: Path
    perplexity: float


def _num(value: float | None, digits: int, scale: float = 1.0) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value / scale:.{digits}f}"


def table_cells(
    results: list[CandidateResult], plan: MeasurePlan
) -> tuple[list[str], list[list[str]]]:
    low, high = plan.streams[0], plan.streams[-1]
    prompt = next(
        (r.measurement.prompt_tokens for r in results if r.measurement is not None),
        plan.prompt_tokens,
    )
    headers = [
        "candidate", "verdict", "reason", "size MiB", "perplexity", "vs ref",
        f"TTFT ms ({prompt} tok)", f"ITL ms @{low}", f"ITL ms @{high}",
        f"tok/s @{low}", f"tok/s @{high}", "peak RSS MiB",
    ]  # fmt: skip
    cells = []
    for r in results:
        m = r.measurement
        line = [r.name, r.verdict_word(), r.reason()]
        line += [
            _num(r.size_bytes, 0, MIB),
            _num(r.perplexity, 3),
            "—" if not math.isfinite(r.ppl_increase) else f"{r.ppl_increase:+.2%}",
            _num(m.ttft_ms if m else None, 1),
            _num(m.itl_ms.get(low) if m else None, 2),
            _num(m.itl_ms.get(high) if m else None, 2),
            _num(m.tokens_per_s.get(low) if m else None, 1),
            _num(m.tokens_per_s.get(high) if m else None, 1),
            _num(m.peak_rss_bytes if m else None, 0, MIB),
        ]
        cells.append(line)
    return headers, cells


def _legend(
    results: list[CandidateResult],
    reference: Reference,
    thresholds: Thresholds,
    plan: MeasurePlan,
) -> list[str]:
    reused = [r.name for r in results if r.reused]
    wants = [f"perplexity at most {thresholds.max_ppl_increase:+.1%} vs the reference"]
    if thresholds.min_tokens_per_s is not None:
        wants.append(f"at least {thresholds.min_tokens_per_s:g} tok/s at 1 stream")
    if thresholds.max_memory_gib is not None:
        wants.append(f"peak worker RSS at most {thresholds.max_memory_gib:g} GiB")
    return [
        f"Reference: {reference.label}, perplexity {reference.perplexity:.3f}.",
        "Thresholds: " + "; ".join(wants) + ".",
        (
            f"Each candidate served by its engine's worker process (server defaults), alone; "
            f"TTFT: median of {plan.ttft_requests} cold prompts; ITL (median) and output "
            f"tok/s (all streams together): {plan.decode_requests} short-chat requests of "
            f"up to {plan.max_tokens} tokens at each stream count; peak RSS: the worker's "
            f"VmHWM, loading included; perplexity on medserve.quant.accuracy.EVAL_TEXTS."
        ),
        *([f"Builds reused from the work folder: {', '.join(reused)}."] if reused else []),
    ]


def text_report(
    results: list[CandidateResult],
    reference: Reference,
    thresholds: Thresholds,
    plan: MeasurePlan,
) -> str:
    headers, cells = table_cells(results, plan)
    return (
        render_text(headers, cells)
        + "\n\n"
        + "\n".join(_legend(results, reference, thresholds, plan))
        + "\n"
    )


def markdown_report(
    results: list[CandidateResult],
    reference: Reference,
    thresholds: Thresholds,
    plan: MeasurePlan,
    environment: dict[str, Any],
) -> str:
    machine = environment["machine"]
    headers, cells = table_cells(results, plan)
    loads = [f"{r.name} {r.load_average:.2f}" for r in results if r.load_average is not None]
    lines = [
        f"Measured {environment['date']} on {machine['cpu_model']} "
        f"({machine['logical_cpus']} logical CPUs, load average "
        f"{machine['load_average'][0]:.2f} at start), commit "
        f"{environment.get('git_commit') or 'unknown'}.",
        "",
        f"Command: `{environment['command']}`",
        "",
        render_markdown(headers, cells),
        "",
        *(f"- {line}" for line in _legend(results, reference, thresholds, plan)),
    ]
    if loads:
        lines.append("- Load average before each measurement: " + ", ".join(loads) + ".")
    return "\n".join(lines) + "\n"


def json_document(
    results: list[CandidateResult],
    reference: Reference,
    thresholds: Thresholds,
    plan: MeasurePlan,
    environment: dict[str, Any],
    hf_dir: Path,
) -> dict[str, Any]:
    def finite(value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None  # JSON has no NaN

    candidates = []
    for r in results:
        m = r.measurement
        candidates.append(
            {
                "name": r.name,
                "engine": r.engine,
                "precision": r.precision,
                "status": r.status,
                "message": r.message,
                "verdict": None
                if r.verdict is None
                else {"passed": r.verdict.passed, "reasons": list(r.verdict.reasons)},
                "reused_build": r.reused,
                "build_s": round(r.build_s, 1),
                "size_bytes": r.size_bytes,
                "perplexity": finite(r.perplexity),
                "ppl_increase": finite(r.ppl_increase),
                "load_average_before": r.load_average,
                "ttft_ms": finite(m.ttft_ms) if m else None,
                "ttft_prompt_tokens": m.prompt_tokens if m else None,
                "itl_ms": {str(c): finite(v) for c, v in m.itl_ms.items()} if m else None,
                "tokens_per_s": {str(c): v for c, v in m.tokens_per_s.items()} if m else None,
                "peak_rss_bytes": m.peak_rss_bytes if m else None,
                "failed_requests": m.failed_requests if m else None,
                "errors": m.errors if m else None,
                "runs": [_row_json(row) for row in m.rows] if m else [],
            }
        )
    return {
        "schema": SCHEMA,
        **environment,
        "hf_dir": str(hf_dir.resolve()),
        "reference": {
            "label": reference.label,
            "folder": str(reference.folder),
            "perplexity": reference.perplexity,
        },
        "thresholds": {**asdict(thresholds), "memory_unit_bytes": GIB},
        "plan": {**asdict(plan), "streams": list(plan.streams)},
        "candidates": candidates,
    }


def _row_json(row: Row) -> dict[str, Any]:
    return {
        "workload": row.workload,
        "phase": row.phase,
        "concurrency": row.concurrency,
        "summary": asdict(row.summary),
    }


def write_chart(results: list[CandidateResult], path: Path, title: str) -> None:
    """tokens/s and ITL per candidate at each stream count (raises ChartUnavailable)."""
    from medserve.benchmarks.chart import ChartUnavailable, write_png

    rows = [
        row
        for r in results
        if r.measurement is not None
        for row in r.measurement.rows
        if row.workload == "short-chat"
    ]
    if not rows:
        raise ChartUnavailable("no candidate was measured")
    write_png(rows, path, title)
