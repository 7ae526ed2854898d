"""Result rows, ratios against the first target, and the terminal / Markdown tables."""

from __future__ import annotations

from dataclasses import replace

from medserve.benchmarks.machine import cpu_info
from medserve.benchmarks.results import baseline_ratios, rows_from_runs
from medserve.benchmarks.runner import RunResult
from medserve.benchmarks.stats import RequestResult, Summary, summarise
from medserve.benchmarks.tables import (
    failure_lines,
    markdown_report,
    render_text,
    table_cells,
    text_report,
)


def _summary(tokens_per_s: float, itl_ms: float, ttft_ms: float) -> Summary:
    one = RequestResult(ok=True, ttft_s=0.1, latency_s=1.0, completion_tokens=10)
    return replace(
        summarise([one], wall_s=1.0),
        output_tokens_per_s=tokens_per_s,
        itl_median_ms=itl_ms,
        ttft_median_ms=ttft_ms,
        prompt_tokens_median=40.0,
    )


def _run(target: str, concurrency: int, repeat: int, tokens_per_s: float) -> RunResult:
    return RunResult(
        target=target,
        workload="short-chat",
        phase="",
        concurrency=concurrency,
        repeat=repeat,
        summary=_summary(tokens_per_s, itl_ms=1000 / tokens_per_s, ttft_ms=50.0),
        requests=[],
    )


# Interleaved as the runner produces them: per concurrency, per repeat, A then B.
RUNS = [
    _run("A", 1, 0, 100.0),
    _run("B", 1, 0, 140.0),
    _run("A", 1, 1, 110.0),
    _run("B", 1, 1, 160.0),
    _run("A", 1, 2, 90.0),
    _run("B", 1, 2, 150.0),
    _run("A", 4, 0, 200.0),
    _run("B", 4, 0, 100.0),
]


def test_rows_take_the_median_of_repeats_and_keep_each_run() -> None:
    rows = rows_from_runs(RUNS, ["A", "B"])
    assert [(r.concurrency, r.target) for r in rows] == [(1, "A"), (1, "B"), (4, "A"), (4, "B")]
    assert rows[0].summary.output_tokens_per_s == 100.0
    assert [run.output_tokens_per_s for run in rows[1].runs] == [140.0, 160.0, 150.0]
    assert rows[1].summary.output_tokens_per_s == 150.0


def test_rows_follow_the_target_order_given_not_the_run_order() -> None:
    rows = rows_from_runs(list(reversed(RUNS)), ["A", "B"])
    assert [(r.concurrency, r.target) for r in rows] == [(4, "A"), (4, "B"), (1, "A"), (1, "B")]


def test_ratios_are_against_the_first_target_of_the_same_setting() -> None:
    ratios = baseline_ratios(rows_from_runs(RUNS, ["A", "B"]))
    assert ratios[0]["output_tokens_per_s"] == 1.0
    assert ratios[1]["output_tokens_per_s"] == 1.5  # 150 vs 100 at concurrency 1
    assert ratios[3]["output_tokens_per_s"] == 0.5  # 100 vs 200 at concurrency 4
    assert ratios[3]["itl_median_ms"] == 2.0  # slower per token: ratio above 1


def test_table_shows_ratio_columns_only_when_comparing() -> None:
    rows = rows_from_runs(RUNS, ["A", "B"])
    headers, cells = table_cells(rows, spread=False)
    assert "tok/s vs first" in headers
    tok_ratio = headers.index("tok/s vs first")
    assert [line[tok_ratio] for line in cells] == ["1.00x", "1.50x", "1.00x", "0.50x"]
    single, _ = table_cells([row for row in rows if row.target == "A"], spread=False)
    assert "tok/s vs first" not in single


def test_markdown_cells_carry_every_repeat_after_the_median() -> None:
    headers, cells = table_cells(rows_from_runs(RUNS, ["A", "B"]), spread=True)
    column = headers.index("out tok/s")
    assert cells[1][column] == "150.0 [140.0, 160.0, 150.0]"
    assert cells[2][column] == "200.0"  # a single run: no brackets


def test_text_table_aligns_columns() -> None:
    text = render_text(["name", "value"], [["a", "1.0"], ["longer", "100.0"]])
    lines = text.splitlines()
    assert lines[0] == "name    value"
    assert lines[2] == "a         1.0"  # numbers right-aligned under their header
    assert lines[3] == "longer  100.0"
    assert len({len(line) for line in lines}) == 1


def test_reports_name_the_cpu_command_and_token_count() -> None:
    rows = rows_from_runs(RUNS, ["A", "B"])
    targets = [
        {"name": "A", "url": "http://a", "model": "m", "http_client": "lean"},
        {"name": "B", "url": "http://b", "model": "m", "http_client": "lean"},
    ]
    environment = {
        "date": "2026-12-01T00:00:00+00:00",
        "command": "medserve bench --compare http://a http://b",
        "git_commit": "abc123",
        "machine": {"cpu_model": "Test CPU 9000", "logical_cpus": 2, "load_average": [0.5]},
    }
    markdown = markdown_report(rows, targets, environment)
    assert (
        "Test CPU 9000" in markdown and "`medserve bench --compare http://a http://b`" in markdown
    )
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(rows)  # header, alignment, one line per row
    assert all(line.count("|") == table_lines[0].count("|") for line in table_lines)
    assert "counted as content deltas (no usage sent)" in markdown  # no usage in RUNS
    assert "A: http://a, model m, lean client" in text_report(rows, targets)


CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t: 0
flags\t\t: fpu avx2 avx512f avx512_vnni amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t: 0
flags\t\t: fpu avx2 avx512f avx512_vnni amx_tile
"""


def test_cpu_info_names_the_model_cores_and_features() -> None:
    info = cpu_info(CPUINFO)
    assert info["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["physical_cores"] == 1  # two hyper-threads of one core
    assert info["cpu_features"] == ["avx2", "avx512f", "avx512_vnni", "amx_tile"]


def test_failures_are_explained_not_only_counted() -> None:
    rows = rows_from_runs(RUNS[:1], ["A"])
    assert failure_lines(rows) == []
    rows[0].summary.errors = {"timeout": 2, "HTTP 503: overloaded": 1}
    assert failure_lines(rows) == ["failed: short-chat c=1 A: HTTP 503: overloaded x1, timeout x2"]
