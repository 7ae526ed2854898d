"""Overload and failure: a full queue answers 503 at once; a worker killed like an OOM kill
fails its in-flight requests (never a hang) and comes back on its own."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BUNDLED_MODEL
from tests.server_process import ServerProcess

ESSAY = {
    "messages": [{"role": "user", "content": "Write a long essay on surgery."}],
    "temperature": 0,
    "max_tokens": 3000,
}


@pytest.fixture(scope="module")
def small_server(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One sequence at a time and one waiting: a third concurrent request is refused."""
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "1",
        "MEDSERVE_ENGINE_MAX_QUEUE": "1",
        "MEDSERVE_CASES_ENABLED": "false",
    }
    with ServerProcess.start(tmp_path_factory.mktemp("small"), env=env) as server:
        yield server


def _in_flight(server: ServerProcess) -> int:
    return httpx.get(server.base_url + "/ready").json()["in_flight"][BUNDLED_MODEL]


def _wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_full_queue_is_503_and_admitted_requests_still_finish(
    small_server: ServerProcess,
) -> None:
    url = small_server.base_url + "/v1/chat/completions"
    body = {**ESSAY, "max_tokens": 40}
    with ThreadPoolExecutor(2) as pool:
        admitted = [pool.submit(httpx.post, url, json=body, timeout=120) for _ in range(2)]
        _wait_until(lambda: _in_flight(small_server) == 2, 10, "two requests in flight")
        refused = httpx.post(url, json=body, timeout=30)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded"
        assert [f.result().status_code for f in admitted] == [200, 200]


def test_killed_worker_fails_in_flight_requests_and_restarts(
    small_server: ServerProcess,
) -> None:
    server = small_server
    worker_pid = httpx.get(server.base_url + "/metrics").json()["models"][BUNDLED_MODEL]["pid"]
    outcome: dict[str, Any] = {}

    def long_request() -> None:
        response = httpx.post(server.base_url + "/v1/chat/completions", json=ESSAY, timeout=60)
        outcome["status"] = response.status_code
        outcome["body"] = response.json()

    client = threading.Thread(target=long_request)
    client.start()
    _wait_until(lambda: _in_flight(server) == 1, 10, "the request to start")
    time.sleep(0.5)  # let it generate for a while
    os.kill(worker_pid, signal.SIGKILL)
    client.join(30)
    assert not client.is_alive(), "the in-flight request hung after its worker died"
    assert outcome["status"] == 503
    assert outcome["body"]["error"]["code"] == "backend_error"

    _wait_until(
        lambda: httpx.get(server.base_url + "/ready").status_code == 200, 120, "the restart"
    )
    stats = httpx.get(server.base_url + "/metrics").json()["models"][BUNDLED_MODEL]
    assert stats["pid"] != worker_pid and stats["restarts"] == 1
    answer = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 16,
        },
        timeout=60,
    ).json()
    assert "Paris" in answer["choices"][0]["message"]["content"]
    assert server.process.poll() is None  # the server itself never went down
