"""`medserve bench` against real servers: it must measure real streamed tokens.

Two real medserve servers on the bundled model: the shared ``llm_server`` (prefix caching off)
and one started here with prefix caching on, so a comparison has two genuinely different
targets and the long-prompt ``cached`` phase has a cache to hit.  Runs are tiny (few requests,
few tokens, a shortened long prompt) to keep the whole file well under two minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server_process import ServerProcess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", "bench", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def caching_server(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with ServerProcess.start(
        tmp_path_factory.mktemp("bench_server"),
        env={
            "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
            "MEDSERVE_ENGINE_MAX_NUM_SEQS": "4",
            "MEDSERVE_ENGINE_KV_CACHE_GB": "1",
            "MEDSERVE_ENGINE_ENABLE_PREFIX_CACHING": "true",
            "MEDSERVE_CASES_ENABLED": "false",
        },
    ) as server:
        yield server


def _result(document: dict[str, Any], target: str, workload: str, phase: str = "") -> Any:
    return next(
        r
        for r in document["results"]
        if (r["target"], r["workload"], r["phase"]) == (target, workload, phase)
    )


def test_bench_cli_reports_measured_figures(llm_server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    completed = _bench(
        "--url",
        llm_server.base_url,
        "--requests",
        "4",
        "--concurrency",
        "2",
        "--max-tokens",
        "12",
        "--json",
        str(out),
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(out.read_text())
    (result,) = document["results"]
    median = result["median"]
    assert (result["workload"], result["concurrency"]) == ("short-chat", 2)
    assert median["failed"] == 0 and median["requests"] == 4
    assert document["targets"][0]["model"] == "smollm2-135m-instruct"
    assert 0 < median["completion_tokens_median"] <= 12
    assert median["token_count"] == "usage"  # medserve sends usage when asked
    assert median["prompt_tokens_median"] > 0
    assert median["ttft_median_ms"] > 0 and median["itl_median_ms"] > 0
    assert median["output_tokens_per_s"] > 0
    assert median["client_cpu_us_per_token"] > 0
    assert len(document["requests"]) == 4 and all(r["ok"] for r in document["requests"])
    assert document["warmup"][document["targets"][0]["name"]]["ok"]
    # The machine is named, from this machine.
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu_model = next(
        line.split(":", 1)[1].strip()
        for line in cpuinfo.splitlines()
        if line.startswith("model name")
    )
    assert document["machine"]["cpu_model"] == cpu_model
    assert document["machine"]["logical_cpus"] >= 1
    assert document["command"].startswith("medserve bench --no-progress --url ")
    assert "smollm2-135m-instruct" in completed.stdout and "TTFT p50 ms" in completed.stdout


def test_bench_cli_fails_clearly_without_a_server() -> None:
    completed = _bench("--url", "http://127.0.0.1:9")
    assert completed.returncode == 2
    assert "cannot reach" in completed.stderr


def test_compare_runs_every_workload_on_two_servers_into_one_report(
    llm_server: ServerProcess, caching_server: ServerProcess, tmp_path: Path
) -> None:
    out_json, out_md, out_png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    completed = _bench(
        "--compare",
        llm_server.base_url,
        caching_server.base_url,
        "--label",
        "plain",
        "cached",
        "--workload",
        "short-chat",
        "long-prompt",
        "long-output",
        "--concurrency",
        "1,2",
        "--requests",
        "2",
        "--max-tokens",
        "8",
        "--long-prompt-tokens",
        "300",
        "--long-output-tokens",
        "24",
        "--json",
        str(out_json),
        "--markdown",
        str(out_md),
        "--png",
        str(out_png),
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(out_json.read_text())
    settings = {(r["workload"], r["phase"], r["concurrency"]) for r in document["results"]}
    assert settings == {
        (workload, phase, c)
        for workload, phase in [
            ("short-chat", ""),
            ("long-prompt", "cold"),
            ("long-prompt", "cached"),
            ("long-output", ""),
        ]
        for c in (1, 2)
    }
    assert len(document["results"]) == 2 * len(settings)  # both targets in every setting
    medians = {
        (r["target"], r["workload"], r["phase"], r["concurrency"]): r["median"]
        for r in document["results"]
    }
    for result in document["results"]:
        assert result["median"]["failed"] == 0
        baseline = medians[("plain", result["workload"], result["phase"], result["concurrency"])]
        expected = result["median"]["output_tokens_per_s"] / baseline["output_tokens_per_s"]
        assert result["vs_first_target"]["output_tokens_per_s"] == pytest.approx(expected)

    # Interleaved: the targets take turns run by run, never all of one and then the other.
    turns = [r["target"] for r in document["requests"]]
    turns = [t for i, t in enumerate(turns) if i == 0 or t != turns[i - 1]]
    rounds = 3 * 2  # workloads x concurrencies, one repeat
    assert turns == ["plain", "cached"] * rounds

    # long-prompt: ~300 prompt tokens; the repeat hits the prefix cache of the caching server.
    def caching_server_phase(phase: str) -> list[dict[str, Any]]:
        return [
            r["median"]
            for r in document["results"]
            if (r["target"], r["workload"], r["phase"]) == ("cached", "long-prompt", phase)
        ]

    cold, cached = caching_server_phase("cold"), caching_server_phase("cached")
    assert len(cold) == len(cached) == 2  # one per concurrency
    assert all(run["prompt_tokens_median"] > 250 for run in cold)
    # Summed over both concurrencies, so one slow spell on the shared machine cannot flip it.
    hits, misses = (sum(run["ttft_median_ms"] for run in runs) for runs in (cached, cold))
    assert hits < misses / 2
    # long-output: reports how many tokens really came, within the budget.
    long_output = _result(document, "plain", "long-output")["median"]
    assert 0 < long_output["completion_tokens_min"] <= long_output["completion_tokens_max"] <= 24

    assert "tok/s vs first" in completed.stdout and "cached" in completed.stdout
    markdown = out_md.read_text()
    assert document["machine"]["cpu_model"] in markdown
    assert markdown.count("| long-prompt cached |") == 4  # 2 targets x 2 concurrencies
    assert out_png.read_bytes()[:8] == PNG_MAGIC and out_png.stat().st_size > 10_000


def test_lean_client_counts_the_same_tokens_as_httpx(
    llm_server: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "clients.json"
    completed = _bench(
        "--compare",
        llm_server.base_url,
        llm_server.base_url,
        "--label",
        "lean",
        "httpx",
        "--http-client",
        "lean",
        "httpx",
        "--requests",
        "3",
        "--concurrency",
        "1",
        "--max-tokens",
        "16",
        "--json",
        str(out),
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(out.read_text())
    by_client = {
        name: [
            (r["completion_tokens"], r["output_events"])
            for r in document["requests"]
            if r["target"] == name
        ]
        for name in ("lean", "httpx")
    }
    assert by_client["lean"] == by_client["httpx"]  # greedy: the same answers, event for event
    assert all(events > 0 for _, events in by_client["lean"])
    for name in ("lean", "httpx"):
        assert _result(document, name, "short-chat")["median"]["client_cpu_us_per_token"] > 0


def test_a_request_past_the_timeout_fails_and_the_server_stops(
    llm_server: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "timeout.json"
    completed = _bench(
        "--url",
        llm_server.base_url,
        "--workload",
        "long-output",
        "--requests",
        "1",
        "--concurrency",
        "1",
        "--timeout",
        "1",
        "--json",
        str(out),
    )
    assert completed.returncode == 1  # a failed request fails the command
    assert "failed: long-output c=1" in completed.stdout and "timeout x1" in completed.stdout
    median = json.loads(out.read_text())["results"][0]["median"]
    assert median["failed"] == 1 and median["errors"] == {"timeout": 1}
    # The client hung up at the deadline, so the server logged a cut-short request (not
    # 1,000 tokens generated for nobody).
    entries = [json.loads(x) for x in llm_server.log().splitlines() if x.startswith("{")]
    long_ones = [e for e in entries if e.get("user_agent") == "medserve-bench"]
    assert long_ones and long_ones[-1]["latency_ms"] < 5000


def test_bench_engine_measures_core_worker_and_http_in_one_run(
    llm_server: ServerProcess, models_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "engine.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medserve.server.cli",
            "bench",
            "engine",
            "--no-progress",
            "--models-dir",
            str(models_dir),
            "--model",
            "smollm2-135m-instruct",
            "--variant",
            "default:",
            "--variant",
            "two-threads:num_threads=2,performance_hint=LATENCY",
            "--worker",
            "--url",
            llm_server.base_url,
            "--url-label",
            "http",
            "--requests",
            "2",
            "--concurrency",
            "1",
            "--max-tokens",
            "8",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    targets = {t["name"]: t for t in document["targets"]}
    assert set(targets) == {"default", "two-threads", "worker", "http"}
    assert targets["two-threads"]["options"]["num_threads"] == 2
    assert targets["two-threads"]["options"]["performance_hint"] == "LATENCY"
    for name in ("default", "two-threads", "worker"):
        assert targets[name]["step_ms_p50"] > 0  # the engine's own step time, for comparison
        assert _result(document, name, "short-chat")["median"]["failed"] == 0
    # Greedy decoding: every level of the path produces the same number of tokens.
    counts = {
        name: _result(document, name, "short-chat")["median"]["completion_tokens_median"]
        for name in targets
    }
    assert len(set(counts.values())) == 1, counts
    assert document["command"].startswith("medserve bench engine ")


def test_bench_engine_rejects_an_unknown_engine_option(models_dir: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medserve.server.cli",
            "bench",
            "engine",
            "--models-dir",
            str(models_dir),
            "--model",
            "smollm2-135m-instruct",
            "--variant",
            "x:warp_drive=on",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown engine option 'warp_drive'" in result.stderr
