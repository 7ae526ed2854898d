"""Benchmark arithmetic: percentiles, the summary of a run, medians across repeats, ratios."""

from __future__ import annotations

from dataclasses import replace

import pytest
from medserve.benchmarks.stats import (
    RequestResult,
    Summary,
    combine_runs,
    percentile,
    ratio,
    summarise,
    token_count_source,
)


def test_nearest_rank_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of arrival does not matter


def _ok(ttft: float, latency: float, tokens: int, gaps: list[float], **kw: object) -> RequestResult:
    return RequestResult(
        ok=True,
        ttft_s=ttft,
        latency_s=latency,
        completion_tokens=tokens,
        token_gaps_s=gaps,
        output_events=len(gaps) + 1,
        usage_reported=True,
        **kw,  # type: ignore[arg-type]
    )


def test_summary_counts_failures_tokens_and_client_cpu() -> None:
    results = [
        _ok(0.1, 1.0, 10, [0.02, 0.04], prompt_tokens=40),
        _ok(0.3, 2.0, 30, [0.03], prompt_tokens=60),
        RequestResult(ok=False, error="HTTP 503: overloaded"),
        RequestResult(ok=False, error="HTTP 503: overloaded"),
    ]
    summary = summarise(results, wall_s=2.0, client_cpu_s=0.004)
    assert (summary.requests, summary.failed) == (4, 2)
    assert summary.errors == {"HTTP 503: overloaded": 2}
    assert summary.ttft_median_ms == 200.0
    assert summary.itl_median_ms == 30.0
    assert summary.output_tokens_per_s == 20.0  # 40 tokens over 2 s of wall time
    assert summary.requests_per_s == 1.0  # failures do not count as served
    assert (summary.completion_tokens_min, summary.completion_tokens_max) == (10, 30)
    assert summary.prompt_tokens_median == 50.0
    assert summary.client_cpu_us_per_token == 100.0  # 4 ms of CPU for 40 tokens
    assert summary.token_count == "usage"


def test_summary_of_nothing_but_failures_is_all_zero_not_an_error() -> None:
    summary = summarise([RequestResult(ok=False, error="timeout")], wall_s=1.0)
    assert summary.failed == 1 and summary.output_tokens_per_s == 0.0
    assert summary.ttft_median_ms == 0.0 and summary.client_cpu_us_per_token == 0.0
    assert summary.token_count == "none"


def test_token_count_source_says_how_tokens_were_counted() -> None:
    counted = replace(_ok(0.1, 1.0, 5, []), usage_reported=False)
    assert token_count_source([_ok(0.1, 1.0, 5, [])]) == "usage"
    assert token_count_source([counted]) == "deltas"
    assert token_count_source([counted, _ok(0.1, 1.0, 5, [])]) == "mixed"


def _summary(tokens_per_s: float, failed: int = 0, errors: dict[str, int] | None = None) -> Summary:
    base = summarise([_ok(0.1, 1.0, 10, [0.01])], wall_s=1.0)
    return replace(base, output_tokens_per_s=tokens_per_s, failed=failed, errors=errors or {})


def test_combine_runs_takes_medians_and_never_hides_a_failure() -> None:
    runs = [_summary(50.0), _summary(70.0, failed=1, errors={"timeout": 1}), _summary(60.0)]
    combined = combine_runs(runs)
    assert combined.output_tokens_per_s == 60.0
    assert combined.requests == 3  # one request per run, summed
    assert combined.failed == 1
    assert combined.errors == {"timeout": 1}
    assert combined.completion_tokens_min == 10 and isinstance(combined.completion_tokens_min, int)


def test_combine_runs_marks_disagreeing_token_counts_as_mixed() -> None:
    runs = [_summary(1.0), replace(_summary(1.0), token_count="deltas")]
    assert combine_runs(runs).token_count == "mixed"
    with pytest.raises(ValueError):
        combine_runs([])


def test_ratio_against_the_baseline() -> None:
    assert ratio(150.0, 100.0) == 1.5
    assert ratio(5.0, 0.0) is None  # nothing to compare against
