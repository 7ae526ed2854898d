"""Workloads: what each sends, and the cache-defeating / cache-hitting long-prompt phases."""

from __future__ import annotations

from medserve.benchmarks.runner import Plan
from medserve.benchmarks.workloads import (
    SHORT_CHAT_PROMPTS,
    WorkloadSettings,
    build,
    guideline_text,
)

SETTINGS = WorkloadSettings(num_requests=5, max_tokens=16, long_prompt_tokens=2000)


def test_short_chat_cycles_the_clinical_questions_greedily() -> None:
    (phase,) = build("short-chat", WorkloadSettings(num_requests=10, max_tokens=7), "n")
    assert [r.messages[-1][1] for r in phase.requests[:2]] == list(SHORT_CHAT_PROMPTS[:2])
    assert phase.requests[8] == phase.requests[0]
    assert all(r.max_tokens == 7 and r.temperature == 0.0 for r in phase.requests)


def test_long_prompt_cold_prefixes_are_unique_and_cached_repeats_them_exactly() -> None:
    cold, cached = build("long-prompt", SETTINGS, "run1")
    assert (cold.name, cached.name) == ("cold", "cached")
    firsts = [r.messages[0][1] for r in cold.requests]
    assert len(set(firsts)) == len(firsts)  # no two requests share their first line
    assert cached.requests == cold.requests  # identical prompts: a prefix-cache hit
    other_run, _ = build("long-prompt", SETTINGS, "run2")
    assert not set(firsts) & {r.messages[0][1] for r in other_run.requests}


def test_guideline_length_follows_the_requested_token_count() -> None:
    short, long = guideline_text(500), guideline_text(2000)
    assert 3.5 < len(long.split()) / len(short.split()) < 4.5
    # ~1.3 tokens per word: 2,000 tokens is about 1,500 words
    assert 1400 <= len(long.split()) <= 1700


def test_long_output_asks_for_the_long_output_budget() -> None:
    (phase,) = build("long-output", WorkloadSettings(num_requests=2, long_output_tokens=1000), "")
    assert all(r.max_tokens == 1000 for r in phase.requests)


def test_plan_counts_every_request_for_the_progress_bar() -> None:
    plan = Plan(
        workloads=["short-chat", "long-prompt"],
        concurrencies=[1, 4],
        repeats=3,
        settings=WorkloadSettings(num_requests=5),
    )
    # (5 short + 5 cold + 5 cached) x 2 concurrencies x 3 repeats x 2 targets
    assert plan.total_requests(2) == 15 * 2 * 3 * 2
