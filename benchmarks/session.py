"""One benchmark session, whatever the targets: plan options, measurement, reports.

Shared by ``medserve bench [run]`` (HTTP servers, run_cli.py) and ``medserve bench engine``
(engine_bench.py), so both take the same workload options and write the same terminal table,
JSON, Markdown and PNG.  A sub-command only builds its targets, then::

    add_plan_arguments(parser)             # --workload, --concurrency, --repeats, --json, ...
    args = parser.parse_args(argv)
    check_plan_arguments(parser, args)
    ...build targets...
    return asyncio.run(measure_and_report(targets, args, argv, prog=parser.prog))
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medserve.benchmarks.machine import environment
from medserve.benchmarks.results import json_document, rows_from_runs
from medserve.benchmarks.runner import Plan, RunResult, run_plan, warm_up
from medserve.benchmarks.tables import markdown_report, text_report
from medserve.benchmarks.target import Target
from medserve.benchmarks.workloads import WORKLOADS, WorkloadSettings
from tqdm import tqdm

DEFAULT_WORKLOAD = "short-chat"
DEFAULT_CONCURRENCY = 4


def concurrency_list(text: str) -> list[int]:
    """``"1,4,8"`` -> [1, 4, 8] (also accepts one number)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency must be >= 1: {text!r}")
    return values


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """What to run and where to write it: the options every bench sub-command shares."""
    parser.add_argument(
        "--workload",
        action="extend",
        nargs="+",
        choices=tuple(WORKLOADS),
        help=f"one or more workloads (default {DEFAULT_WORKLOAD})",
    )
    parser.add_argument(
        "--concurrency",
        action="extend",
        type=concurrency_list,
        metavar="N[,N...]",
        help=f"requests in flight, e.g. 1,4,8 (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; median shown")
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="short-chat and long-prompt answer length"
    )
    parser.add_argument(
        "--long-prompt-tokens", type=int, default=2000, help="long-prompt size (estimated)"
    )
    parser.add_argument(
        "--long-output-tokens", type=int, default=1000, help="long-output max_tokens"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--json", type=Path, help="write everything (machine, runs) here")
    parser.add_argument("--markdown", type=Path, help="write a RESULTS.md-ready table here")
    parser.add_argument("--png", type=Path, help="write a tokens/s and ITL chart here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def check_plan_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values before anything is loaded or sent (exits with a usage message)."""
    for name in ("requests", "repeats", "max_tokens", "long_prompt_tokens", "long_output_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if args.png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--png needs matplotlib: pip install -e '.[bench]'")


def plan_from_arguments(args: argparse.Namespace) -> Plan:
    return Plan(
        workloads=list(dict.fromkeys(args.workload or [DEFAULT_WORKLOAD])),
        concurrencies=list(dict.fromkeys(args.concurrency or [DEFAULT_CONCURRENCY])),
        repeats=args.repeats,
        settings=WorkloadSettings(
            num_requests=args.requests,
            max_tokens=args.max_tokens,
            long_prompt_tokens=args.long_prompt_tokens,
            long_output_tokens=args.long_output_tokens,
        ),
        request_timeout_s=args.timeout,
    )


async def measure_and_report(
    targets: Sequence[Target],
    args: argparse.Namespace,
    argv: list[str],
    *,
    prog: str = "medserve bench",
) -> int:
    """Run the plan on ``targets`` (closed afterwards), print the table, write the files.

    ``argv`` and ``prog`` make the command line recorded in the reports.  Returns the exit
    code: 1 if any request failed, else 0.
    """
    plan = plan_from_arguments(args)
    env = environment(argv, prog=prog)
    runs, warmups = await _measure(targets, plan, progress=not args.no_progress)
    descriptions = [{"name": t.name, **t.describe()} for t in targets]
    rows = rows_from_runs(runs, [t.name for t in targets])
    print(text_report(rows, descriptions), end="")
    if args.json:
        document = json_document(
            rows=rows,
            runs=runs,
            targets=descriptions,
            plan=plan,
            environment=env,
            warmups=warmups,
        )
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(markdown_report(rows, descriptions, env), encoding="utf-8")
    if args.png:
        from medserve.benchmarks.chart import write_png

        write_png(rows, args.png, f"{env['machine']['cpu_model']}, {env['date']}")
    return 1 if any(row.summary.failed for row in rows) else 0


async def _measure(
    targets: Sequence[Target], plan: Plan, *, progress: bool
) -> tuple[list[RunResult], dict[str, dict[str, Any]]]:
    """Warm every target up, then run the plan with a progress bar on stderr."""
    bar = tqdm(
        total=plan.total_requests(len(targets)),
        unit="req",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    warmups: dict[str, dict[str, Any]] = {}
    try:
        for target in targets:
            bar.set_description_str(f"warm-up {target.name}")
            result = await warm_up(target, plan.request_timeout_s)
            warmups[target.name] = {
                "ok": result.ok,
                "ttft_s": round(result.ttft_s, 4),
                "error": result.error,
            }
            if not result.ok:
                bar.write(f"medserve bench: warm-up of {target.name} failed: {result.error}")
        runs = await run_plan(
            targets,
            plan,
            on_run_start=bar.set_description_str,
            on_request_done=lambda: bar.update(1),
        )
    finally:
        bar.close()
        for target in targets:
            await target.aclose()
    return runs, warmups
