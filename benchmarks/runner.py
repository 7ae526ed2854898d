"""The measurement core: drive workloads through targets, time every output event, summarise.

Order of a plan: for each workload, each concurrency and each repeat, every target runs once in
turn (A, B, A, B, ...).  The machine is shared and noisy, so interleaving spreads any slow
spell over all targets instead of penalising whichever happened to run then.  Within one
target's run the workload's phases run back to back (long-prompt: ``cold`` then ``cached``).

A run keeps ``concurrency`` requests in flight (closed loop): each worker sends its next
request as soon as its previous one finishes.  Client CPU time (``time.process_time``) is
taken over each run and reported per received token: on 2 shared cores it is CPU the engine
did not get.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from medserve.benchmarks.stats import RequestResult, Summary, summarise
from medserve.benchmarks.target import Target, TargetError
from medserve.benchmarks.workloads import Phase, WorkloadRequest, WorkloadSettings, build

WARMUP_REQUEST = WorkloadRequest((("user", "Say hello."),), max_tokens=8)


@dataclass(frozen=True)
class Plan:
    workloads: Sequence[str]
    concurrencies: Sequence[int]
    repeats: int = 1
    settings: WorkloadSettings = field(default_factory=WorkloadSettings)
    request_timeout_s: float = 600.0

    def total_requests(self, num_targets: int) -> int:
        phases = [phase for name in self.workloads for phase in build(name, self.settings, "")]
        per_round = sum(len(phase.requests) for phase in phases)
        return per_round * len(self.concurrencies) * self.repeats * num_targets


@dataclass
class RunResult:
    """One target's run of one workload phase at one concurrency, in one repeat."""

    target: str
    workload: str
    phase: str
    concurrency: int
    repeat: int
    summary: Summary
    requests: list[RequestResult]


async def measure(target: Target, request: WorkloadRequest, timeout_s: float) -> RequestResult:
    """Serve one request; TTFT and ITL from the target's token times (see target.py)."""
    started = time.perf_counter()
    try:
        completion = await asyncio.wait_for(target.generate(request), timeout_s)
    except TargetError as exc:
        return RequestResult(ok=False, latency_s=time.perf_counter() - started, error=str(exc))
    except TimeoutError:
        return RequestResult(ok=False, latency_s=time.perf_counter() - started, error="timeout")
    end = time.perf_counter()
    times = completion.token_times
    if not times:
        return RequestResult(ok=False, latency_s=end - started, error="no output")
    exact = completion.completion_tokens
    return RequestResult(
        ok=True,
        ttft_s=times[0] - started,
        latency_s=end - started,
        completion_tokens=len(times) if exact is None else exact,
        prompt_tokens=completion.prompt_tokens or 0,
        token_gaps_s=[b - a for a, b in itertools.pairwise(times)],
        output_events=len(times),
        usage_reported=exact is not None,
    )


async def run_phase(
    target: Target,
    phase: Phase,
    concurrency: int,
    timeout_s: float,
    on_request_done: Callable[[], None] = lambda: None,
) -> tuple[Summary, list[RequestResult]]:
    """Run a phase's requests, ``concurrency`` at a time, in order; summarise the run."""
    results: list[RequestResult | None] = [None] * len(phase.requests)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(phase.requests):
            index = next_index
            next_index += 1
            results[index] = await measure(target, phase.requests[index], timeout_s)
            on_request_done()

    cpu_started = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(phase.requests)))))
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    done = [r for r in results if r is not None]
    return summarise(done, wall, cpu), done


async def warm_up(target: Target, timeout_s: float) -> RequestResult:
    """One short request: a target's first inference compiles kernels and is not representative."""
    return await measure(target, WARMUP_REQUEST, timeout_s)


async def run_plan(
    targets: Sequence[Target],
    plan: Plan,
    *,
    on_run_start: Callable[[str], None] = lambda description: None,
    on_request_done: Callable[[], None] = lambda: None,
) -> list[RunResult]:
    """Every (workload, concurrency, repeat) round, with the targets interleaved in each."""
    runs: list[RunResult] = []
    for workload in plan.workloads:
        for concurrency in plan.concurrencies:
            for repeat in range(plan.repeats):
                for target in targets:
                    # A fresh nonce per run and target: a cold prompt is never in any cache,
                    # even when two "targets" are the same server under two labels.
                    phases = build(workload, plan.settings, secrets.token_hex(6))
                    for phase in phases:
                        label = f"{workload} {phase.name}".strip()
                        on_run_start(f"{label} c={concurrency} #{repeat + 1} {target.name}")
                        summary, results = await run_phase(
                            target, phase, concurrency, plan.request_timeout_s, on_request_done
                        )
                        runs.append(
                            RunResult(
                                target.name,
                                workload,
                                phase.name,
                                concurrency,
                                repeat,
                                summary,
                                results,
                            )
                        )
    return runs
