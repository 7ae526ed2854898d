"""Benchmark arithmetic: percentiles and the summary of a run."""

from __future__ import annotations

from medserve.benchmarks.llm_bench import RequestResult, percentile, summarise


def test_nearest_rank_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) == 0.0


def test_summary_counts_failures_and_tokens() -> None:
    results = [
        RequestResult(
            ok=True, ttft_s=0.1, latency_s=1.0, completion_tokens=10, token_gaps_s=[0.02, 0.04]
        ),
        RequestResult(
            ok=True, ttft_s=0.3, latency_s=2.0, completion_tokens=30, token_gaps_s=[0.03]
        ),
        RequestResult(ok=False, error="HTTP 503"),
    ]
    summary = summarise(results, "m", concurrency=2, max_tokens=32, wall_s=2.0)
    assert summary.failed == 1
    assert summary.ttft_median_ms == 200.0
    assert summary.itl_median_ms == 30.0
    assert summary.output_tokens_per_s == 20.0
    assert summary.requests_per_s == 1.0
