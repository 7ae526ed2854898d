"""What the fault tests share: soak length, engine stats, descriptor counts, SSE reading."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.server_process import ServerProcess

SOAK_SECONDS = float(os.environ.get("MEDSERVE_SOAK_SECONDS", "30"))
"""How long the concurrent-stream soak runs: short in CI; set e.g. 600 for a real soak."""
LONG_SOAK = SOAK_SECONDS >= 120


def model_stats(server: ServerProcess, model: str) -> dict[str, Any]:
    """One worker's stats from the JSON metrics view (/metrics.json; /metrics before it)."""
    for path in ("/metrics.json", "/metrics"):
        response = httpx.get(server.base_url + path, timeout=30)
        if response.status_code == 200 and response.headers["content-type"].startswith(
            "application/json"
        ):
            return response.json()["models"][model]
    raise AssertionError("no JSON metrics view answered")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no thread count for {pid}")


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def sse_payloads(lines: Any) -> Any:
    """The decoded ``data:`` payloads of an SSE line iterator ("[DONE]" stays a string)."""
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)
