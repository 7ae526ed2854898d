"""A worker process killed like an OOM kill: clients get an error, never a hang; it comes back."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import BUNDLED_MODEL
from tests.server_process import ServerProcess


def _wait_status(base_url: str, path: str, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(base_url + path, timeout=5).status_code == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never returned {status}")


def test_killed_worker_fails_in_flight_requests_and_restarts(
    models_dir: Path, tmp_path: Path
) -> None:
    env = {"MEDSERVE_ENGINE_MODELS_DIR": str(models_dir), "MEDSERVE_CASES_ENABLED": "false"}
    with ServerProcess.start(tmp_path, env=env) as server:
        stats = httpx.get(server.base_url + "/metrics").json()["models"][BUNDLED_MODEL]
        worker_pid = stats["pid"]

        outcome: dict[str, Any] = {}

        def long_request() -> None:
            started = time.monotonic()
            response = httpx.post(
                server.base_url + "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "Write a long essay on surgery."}],
                    "temperature": 0,
                    "max_tokens": 3000,
                },
                timeout=60,
            )
            outcome["status"] = response.status_code
            outcome["body"] = response.json()
            outcome["seconds"] = time.monotonic() - started

        client = threading.Thread(target=long_request)
        client.start()
        time.sleep(1.0)  # let it start generating
        os.kill(worker_pid, signal.SIGKILL)
        client.join(30)
        assert not client.is_alive(), "the in-flight request hung after its worker died"
        assert outcome["status"] == 503
        assert outcome["body"]["error"]["code"] == "backend_error"

        _wait_status(server.base_url, "/ready", 200, timeout_s=120)
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
