"""Benchmark arithmetic: per-request records, the summary of one run, medians across repeats.

Pure functions over plain dataclasses, so the numbers in every report are unit-tested without a
server.  Conventions: nearest-rank percentiles (a p99 is a latency some request really had);
throughput is tokens over the run's wall time (what the server sustained, queueing included);
ITL is the gap between consecutive output events of one request.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass
class RequestResult:
    """What one request looked like from the client."""

    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    token_gaps_s: list[float] = field(default_factory=list)
    output_events: int = 0
    usage_reported: bool = False  # completion_tokens came from the target, not from counting
    error: str = ""


@dataclass
class Summary:
    """One run (one target, workload phase, concurrency and repeat), or a median of runs."""

    requests: int
    failed: int
    wall_s: float
    ttft_median_ms: float
    ttft_p99_ms: float
    itl_median_ms: float
    itl_p99_ms: float
    latency_median_s: float
    output_tokens_per_s: float
    requests_per_s: float
    completion_tokens_median: float
    completion_tokens_min: int
    completion_tokens_max: int
    prompt_tokens_median: float
    token_count: str  # "usage" (server-reported), "deltas" (counted events) or "mixed"
    client_cpu_s: float
    client_cpu_us_per_token: float
    errors: dict[str, int] = field(default_factory=dict)


# Fields that are added up, not medianed, when runs are combined: a failure is never hidden.
_SUMMED = {"requests", "failed"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def token_count_source(results: list[RequestResult]) -> str:
    reported = {r.usage_reported for r in results if r.ok}
    if reported == {True}:
        return "usage"
    if reported == {False}:
        return "deltas"
    return "mixed" if reported else "none"


def summarise(results: list[RequestResult], wall_s: float, client_cpu_s: float = 0.0) -> Summary:
    """Summary of one run: ``wall_s`` from the first request sent to the last one finished."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s * 1000 for r in ok]
    gaps = [g * 1000 for r in ok for g in r.token_gaps_s]
    completion = [r.completion_tokens for r in ok]
    tokens = sum(completion)
    return Summary(
        requests=len(results),
        failed=len(results) - len(ok),
        wall_s=round(wall_s, 3),
        ttft_median_ms=round(_median(ttfts), 1),
        ttft_p99_ms=round(percentile(ttfts, 99), 1),
        itl_median_ms=round(_median(gaps), 2),
        itl_p99_ms=round(percentile(gaps, 99), 2),
        latency_median_s=round(_median([r.latency_s for r in ok]), 3),
        output_tokens_per_s=round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        requests_per_s=round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        completion_tokens_median=_median([float(c) for c in completion]),
        completion_tokens_min=min(completion, default=0),
        completion_tokens_max=max(completion, default=0),
        prompt_tokens_median=_median([float(r.prompt_tokens) for r in ok]),
        token_count=token_count_source(results),
        client_cpu_s=round(client_cpu_s, 4),
        # Client cost per token received: the bench shares the cores with the engine.
        client_cpu_us_per_token=round(client_cpu_s * 1e6 / tokens, 1) if tokens else 0.0,
        errors=dict(Counter(r.error for r in results if not r.ok)),
    )


def combine_runs(runs: list[Summary]) -> Summary:
    """Median of each figure across repeated runs; request and failure counts are summed."""
    if not runs:
        raise ValueError("no runs to combine")
    values: dict[str, object] = {}
    for f in fields(Summary):
        column = [getattr(run, f.name) for run in runs]
        if f.name in _SUMMED:
            values[f.name] = sum(column)
        elif f.name == "token_count":
            values[f.name] = column[0] if len(set(column)) == 1 else "mixed"
        elif f.name == "errors":
            merged: Counter[str] = Counter()
            for errors in column:
                merged.update(errors)
            values[f.name] = dict(merged)
        else:
            median = statistics.median(column)
            values[f.name] = type(column[0])(median) if isinstance(column[0], int) else median
    return Summary(**values)  # type: ignore[arg-type]


def ratio(value: float, baseline: float) -> float | None:
    """``value / baseline``, or None when the baseline is zero (nothing to compare against)."""
    return value / baseline if baseline else None
