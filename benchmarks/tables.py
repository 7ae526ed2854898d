"""Result rows as a terminal table and as Markdown ready to paste into benchmarks/RESULTS.md.

Both come from the same cells, so the numbers pasted into RESULTS.md are the ones seen in the
terminal.  With several targets, the ``vs first`` columns divide each figure by the first
target's in the same workload and concurrency (tokens/s above 1 = faster; ITL and TTFT below
1 = faster).  With repeats, the Markdown key figures read ``median [run 1, run 2, ...]``, as
RESULTS.md already does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from medserve.benchmarks.results import Row, baseline_ratios
from medserve.benchmarks.stats import Summary


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


# (header, getter, digits, spread-in-markdown)
_Column = tuple[str, Callable[[Summary], float], int, bool]
COLUMNS: tuple[_Column, ...] = (
    ("TTFT p50 ms", lambda s: s.ttft_median_ms, 1, True),
    ("TTFT p99 ms", lambda s: s.ttft_p99_ms, 1, False),
    ("ITL p50 ms", lambda s: s.itl_median_ms, 2, True),
    ("ITL p99 ms", lambda s: s.itl_p99_ms, 2, False),
    ("latency p50 s", lambda s: s.latency_median_s, 3, False),
    ("out tok/s", lambda s: s.output_tokens_per_s, 1, True),
    ("req/s", lambda s: s.requests_per_s, 2, False),
)
RATIO_HEADERS = (
    ("tok/s vs first", "output_tokens_per_s"),
    ("ITL vs first", "itl_median_ms"),
    ("TTFT vs first", "ttft_median_ms"),
)
LEFT_COLUMNS = (0, 2)  # workload and target; every other column holds numbers


def _tokens_cell(summary: Summary) -> str:
    """Prompt/completion tokens per request (median), with the range when completions vary."""
    prompt = f"{summary.prompt_tokens_median:.0f}" if summary.prompt_tokens_median else "?"
    out = f"{summary.completion_tokens_median:.0f}"
    if summary.completion_tokens_min != summary.completion_tokens_max:
        out += f" ({summary.completion_tokens_min}-{summary.completion_tokens_max})"
    return f"{prompt} / {out}"


def table_cells(rows: Sequence[Row], *, spread: bool) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells; ``spread`` adds each repeat's value after the median."""
    compare = len({row.target for row in rows}) > 1
    headers = ["workload", "c", "target", "tokens in / out"]
    headers += [column[0] for column in COLUMNS]
    headers.append("failed")
    if compare:
        headers += [header for header, _ in RATIO_HEADERS]
    ratios = baseline_ratios(rows)
    cells: list[list[str]] = []
    for index, row in enumerate(rows):
        line = [row.label, str(row.concurrency), row.target, _tokens_cell(row.summary)]
        for _, getter, digits, show_spread in COLUMNS:
            text = _number(getter(row.summary), digits)
            if spread and show_spread and len(row.runs) > 1:
                text += " [" + ", ".join(_number(getter(run), digits) for run in row.runs) + "]"
            line.append(text)
        line.append(f"{row.summary.failed}/{row.summary.requests}")
        if compare:
            line += [_ratio(ratios[index][name]) for _, name in RATIO_HEADERS]
        cells.append(line)
    return headers, cells


def render_text(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Aligned columns: text left, numbers right."""
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(headers)]

    def fmt(line: Sequence[str]) -> str:
        parts = [
            text.ljust(width) if i in LEFT_COLUMNS else text.rjust(width)
            for i, (text, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([fmt(headers), rule, *(fmt(line) for line in cells)])


def render_markdown(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    aligns = ["---" if i in LEFT_COLUMNS else "---:" for i in range(len(headers))]
    lines = [headers, aligns, *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def targets_legend(targets: Sequence[dict[str, Any]], token_counts: dict[str, str]) -> list[str]:
    """One line per target: where it is, which model, and how its tokens were counted."""
    lines = []
    for target in targets:
        where = target.get("url") or target.get("kind", "")
        client = f", {target['http_client']} client" if target.get("http_client") else ""
        count = token_counts.get(target["name"], "none")
        how = {
            "usage": "completion tokens from the server's usage",
            "deltas": "completion tokens counted as content deltas (no usage sent)",
            "mixed": "completion tokens from usage for some requests, deltas for others",
        }.get(count, "no tokens received")
        steps = (
            f"; engine step p50 {target['step_ms_p50']:.2f} ms, p90 {target['step_ms_p90']:.2f} ms"
            if target.get("step_ms_p50")
            else ""
        )
        lines.append(
            f"{target['name']}: {where}, model {target.get('model', '?')}{client}; {how}{steps}"
        )
    return lines


def markdown_report(
    rows: Sequence[Row], targets: Sequence[dict[str, Any]], environment: dict[str, Any]
) -> str:
    """A RESULTS.md section: the machine and command first, then the table and the legend."""
    machine = environment["machine"]
    headers, cells = table_cells(rows, spread=True)
    token_counts = _token_counts(rows)
    repeats = max((len(row.runs) for row in rows), default=1)
    lines = [
        f"Measured {environment['date']} on {machine['cpu_model']} "
        f"({machine['logical_cpus']} logical CPUs, load average {machine['load_average'][0]:.2f} "
        f"at start), commit {environment.get('git_commit') or 'unknown'}.",
        "",
        f"Command: `{environment['command']}`",
        "",
        f"Median of {repeats} run(s)" + (" (each run in brackets)." if repeats > 1 else "."),
        "",
        render_markdown(headers, cells),
        "",
        *(f"- {line}" for line in targets_legend(targets, token_counts)),
    ]
    return "\n".join(lines) + "\n"


def _token_counts(rows: Sequence[Row]) -> dict[str, str]:
    counts: dict[str, set[str]] = {}
    for row in rows:
        counts.setdefault(row.target, set()).add(row.summary.token_count)
    return {
        name: next(iter(found)) if len(found) == 1 else "mixed" for name, found in counts.items()
    }


def failure_lines(rows: Sequence[Row]) -> list[str]:
    """Why requests failed, per row: a failure count alone does not say what to fix."""
    return [
        f"failed: {row.label} c={row.concurrency} {row.target}: "
        + ", ".join(f"{error} x{count}" for error, count in sorted(row.summary.errors.items()))
        for row in rows
        if row.summary.errors
    ]


def text_report(rows: Sequence[Row], targets: Sequence[dict[str, Any]]) -> str:
    headers, cells = table_cells(rows, spread=False)
    legend = targets_legend(targets, _token_counts(rows)) + failure_lines(rows)
    return render_text(headers, cells) + "\n\n" + "\n".join(legend) + "\n"
