"""`medserve bench` against a real server: it must measure real streamed tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.server_process import ServerProcess


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", "bench", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=300,
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
    summary = json.loads(out.read_text())
    assert summary["failed"] == 0 and summary["requests"] == 4
    assert summary["model"] == "smollm2-135m-instruct"
    assert 0 < summary["completion_tokens_median"] <= 12
    assert summary["ttft_median_ms"] > 0 and summary["itl_median_ms"] > 0
    assert summary["output_tokens_per_s"] > 0


def test_bench_cli_fails_clearly_without_a_server() -> None:
    completed = _bench("--url", "http://127.0.0.1:9")
    assert completed.returncode == 2
    assert "cannot reach" in completed.stderr
