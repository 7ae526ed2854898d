"""Speed and memory of one candidate folder, measured through its engine's worker process.

The worker is the process the server would start for the folder (benchmarks/engine_target.py
``WorkerTarget``: same interpreter, protocol, detokenizer and engine settings as serving), and
the requests are the benchmark's own workloads driven by the benchmark's runner
(benchmarks/workloads.py, benchmarks/runner.py):

- TTFT: the ``long-prompt`` workload's cold phase (a unique first line per request, so no
  prefix cache helps) at ~``prompt_tokens`` tokens, one request at a time;
- ITL and output tokens/s: the ``short-chat`` workload at each stream count, closed loop;
- peak RSS: the worker's VmHWM (the kernel's high-water mark of its resident memory, loading
  included) read from /proc just before it is stopped.

Candidates are measured one after another with one worker alive at a time: a 9B model's eight
builds would not fit in memory together, and one worker's RSS is then its own.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medserve.benchmarks.engine_bench import variant_options
from medserve.benchmarks.engine_target import WorkerTarget, engine_configure
from medserve.benchmarks.results import Row, rows_from_runs
from medserve.benchmarks.runner import Plan, RunResult, run_phase, run_plan, warm_up
from medserve.benchmarks.workloads import WorkloadSettings, build
from medserve.server.settings import EngineSettings

TTFT_MAX_TOKENS = 8
"""Enough output for a first text delta whatever the tokenizer; the prefill is what counts."""


@dataclass(frozen=True)
class MeasurePlan:
    prompt_tokens: int = 1000
    """Estimated size of the TTFT prompt (the table gives the counted size)."""
    ttft_requests: int = 3
    streams: tuple[int, ...] = (1, 4)
    decode_requests: int = 4
    """short-chat requests per stream count: at 4 streams, all four run at once."""
    max_tokens: int = 64
    timeout_s: float = 600.0

    def total_requests(self) -> int:
        """Per candidate, warm-up included: the size of the progress bar."""
        return 1 + self.ttft_requests + self.decode_requests * len(self.streams)


FULL_PLAN = MeasurePlan()
QUICK_PLAN = MeasurePlan(prompt_tokens=256, ttft_requests=2, decode_requests=4, max_tokens=16)
"""CI-sized: a quarter of the prompt and of the output, so a torch candidate takes seconds."""


@dataclass
class Measurement:
    ttft_ms: float
    prompt_tokens: int
    itl_ms: dict[int, float]
    tokens_per_s: dict[int, float]
    """Output tokens per second over the run's wall time, all streams together."""
    peak_rss_bytes: int | None
    failed_requests: int
    errors: dict[str, int] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    """The benchmark rows (TTFT phase and each stream count), for the JSON and the chart."""


async def measure_folder(
    name: str,
    folder: Path,
    plan: MeasurePlan,
    *,
    on_run_start: Callable[[str], None] = lambda text: None,
    on_request_done: Callable[[], None] = lambda: None,
) -> Measurement:
    """Start the folder's worker with the server's engine settings, measure, stop it.

    Raises BackendError when the worker cannot start (the caller reports the candidate).
    """
    defaults = EngineSettings()
    configure = engine_configure(
        folder,
        max_num_seqs=max(defaults.max_num_seqs, *plan.streams),
        kv_cache_gb=defaults.kv_cache_gb,
        options=variant_options({}),
    )
    target = WorkerTarget(name, configure)
    on_run_start(f"{name}: starting its worker")
    await target.start()
    try:
        on_run_start(f"{name}: warm-up")
        await warm_up(target, plan.timeout_s)
        on_request_done()
        runs = await _ttft_run(target, plan, on_run_start, on_request_done)
        runs += await run_plan(
            [target],
            Plan(
                workloads=["short-chat"],
                concurrencies=list(plan.streams),
                settings=WorkloadSettings(
                    num_requests=plan.decode_requests, max_tokens=plan.max_tokens
                ),
                request_timeout_s=plan.timeout_s,
            ),
            on_run_start=lambda text: on_run_start(f"{name}: {text.rsplit(' ', 1)[0]}"),
            on_request_done=on_request_done,
        )
        peak_rss = _peak_rss_of_worker()
    finally:
        await target.aclose()
    return _figures(runs, name, peak_rss)


async def _ttft_run(
    target: WorkerTarget,
    plan: MeasurePlan,
    on_run_start: Callable[[str], None],
    on_request_done: Callable[[], None],
) -> list[RunResult]:
    settings = WorkloadSettings(
        num_requests=plan.ttft_requests,
        max_tokens=TTFT_MAX_TOKENS,
        long_prompt_tokens=plan.prompt_tokens,
    )
    cold = build("long-prompt", settings, secrets.token_hex(6))[0]
    on_run_start(f"{target.name}: TTFT, ~{plan.prompt_tokens}-token prompt")
    summary, results = await run_phase(target, cold, 1, plan.timeout_s, on_request_done)
    return [RunResult(target.name, "long-prompt", cold.name, 1, 0, summary, results)]


def _figures(runs: list[RunResult], name: str, peak_rss: int | None) -> Measurement:
    rows = rows_from_runs(runs, [name])
    ttft = next(row for row in rows if row.workload == "long-prompt").summary
    decode = {row.concurrency: row.summary for row in rows if row.workload == "short-chat"}
    errors: dict[str, int] = {}
    for row in rows:
        for error, count in row.summary.errors.items():
            errors[error] = errors.get(error, 0) + count
    return Measurement(
        ttft_ms=ttft.ttft_median_ms if ttft.failed < ttft.requests else math.nan,
        prompt_tokens=int(ttft.prompt_tokens_median),
        itl_ms={
            c: s.itl_median_ms if s.failed < s.requests else math.nan for c, s in decode.items()
        },
        tokens_per_s={c: s.output_tokens_per_s for c, s in decode.items()},
        peak_rss_bytes=peak_rss,
        failed_requests=sum(row.summary.failed for row in rows),
        errors=errors,
        rows=rows,
    )


def _peak_rss_of_worker() -> int | None:
    """VmHWM of this process's one live worker child, in bytes (None if not found).

    WorkerTarget does not expose its process, so the worker is found as the child of this
    process running ``medserve.accel.worker``; the preview keeps one worker alive at a time.
    """
    me = os.getpid()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # The command name in parentheses may hold spaces: fields start after the last ')'.
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent != me:
                continue
            if b"medserve.accel.worker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    if len(found) != 1:
        return None
    try:
        for line in Path(f"/proc/{found[0]}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
