"""From individual runs to result rows (median across repeats) and the JSON document.

A row is one (workload, phase, concurrency, target); its ``summary`` is the median of its
repeats and ``runs`` keeps every repeat, so a reader can see the spread behind each median.
Rows come out grouped by (workload, phase, concurrency), targets in command-line order, so the
first target of each group is the baseline the ratios refer to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from medserve.benchmarks.runner import Plan, RunResult
from medserve.benchmarks.stats import Summary, combine_runs, ratio

SCHEMA = "medserve-bench/2"
# Figures compared against the first target, with how to read the ratio.
RATIO_FIELDS = ("output_tokens_per_s", "itl_median_ms", "ttft_median_ms")


@dataclass
class Row:
    workload: str
    phase: str
    concurrency: int
    target: str
    summary: Summary
    runs: list[Summary]

    @property
    def label(self) -> str:
        return f"{self.workload} {self.phase}".strip()


def rows_from_runs(runs: Sequence[RunResult], target_order: Sequence[str]) -> list[Row]:
    grouped: dict[tuple[str, str, int, str], list[Summary]] = {}
    for run in runs:
        key = (run.workload, run.phase, run.concurrency, run.target)
        grouped.setdefault(key, []).append(run.summary)
    position = {name: i for i, name in enumerate(target_order)}
    first_seen = {key[:3]: i for i, key in reversed(list(enumerate(grouped)))}
    ordered = sorted(grouped, key=lambda k: (first_seen[k[:3]], position[k[3]]))
    return [Row(*key, summary=combine_runs(grouped[key]), runs=grouped[key]) for key in ordered]


def baseline_ratios(rows: Sequence[Row]) -> dict[int, dict[str, float | None]]:
    """For each row index: its RATIO_FIELDS divided by the same group's first row."""
    ratios: dict[int, dict[str, float | None]] = {}
    baseline: Row | None = None
    for index, row in enumerate(rows):
        if baseline is None or (row.workload, row.phase, row.concurrency) != (
            baseline.workload,
            baseline.phase,
            baseline.concurrency,
        ):
            baseline = row
        ratios[index] = {
            name: ratio(getattr(row.summary, name), getattr(baseline.summary, name))
            for name in RATIO_FIELDS
        }
    return ratios


def json_document(
    *,
    rows: Sequence[Row],
    runs: Sequence[RunResult],
    targets: Sequence[dict[str, Any]],
    plan: Plan,
    environment: dict[str, Any],
    warmups: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Everything: machine, command, settings, targets, medians, every run and every request."""
    ratios = baseline_ratios(rows)
    return {
        "schema": SCHEMA,
        **environment,
        "plan": {
            "workloads": list(plan.workloads),
            "concurrency": list(plan.concurrencies),
            "repeats": plan.repeats,
            "request_timeout_s": plan.request_timeout_s,
            **asdict(plan.settings),
        },
        "targets": list(targets),
        "warmup": warmups,
        "results": [
            {
                "workload": row.workload,
                "phase": row.phase,
                "concurrency": row.concurrency,
                "target": row.target,
                "median": asdict(row.summary),
                "vs_first_target": ratios[index],
                "runs": [asdict(run) for run in row.runs],
            }
            for index, row in enumerate(rows)
        ],
        "requests": [
            {
                "target": run.target,
                "workload": run.workload,
                "phase": run.phase,
                "concurrency": run.concurrency,
                "repeat": run.repeat,
                "ok": request.ok,
                "ttft_s": round(request.ttft_s, 5),
                "latency_s": round(request.latency_s, 5),
                "prompt_tokens": request.prompt_tokens,
                "completion_tokens": request.completion_tokens,
                "output_events": request.output_events,
                "error": request.error,
            }
            for run in runs
            for request in run.requests
        ],
    }
