"""SIGTERM drains: new connections are refused at once, in-flight streams that finish within
``server.drain_timeout_s`` finish normally, the ones still running at the deadline are cut,
and the process exits cleanly soon after (uvicorn's graceful shutdown, given our deadline)."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BUNDLED_MODEL
from tests.soak.server import start_server
from tests.soak.support import model_stats, sse_payloads, wait_until

DRAIN_S = 4.0
LONG_PROMPTS = [
    "Count from 1 to 10000, separated by commas.",
    "Write a very long essay about medicine.",
    "List every bone of the human body with a sentence about each.",
]


def _stream(base_url: str, prompt: str, max_tokens: int, record: dict[str, Any]) -> None:
    body = {
        "model": BUNDLED_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    record["events"] = 0
    try:
        with httpx.stream(
            "POST", base_url + "/v1/chat/completions", json=body, timeout=60
        ) as response:
            for payload in sse_payloads(response.iter_lines()):
                record["events"] += 1
                record["last"] = payload
    except httpx.HTTPError as exc:
        record["error"] = type(exc).__name__
    record["ended"] = time.monotonic()


def test_sigterm_drains_in_flight_streams_up_to_the_deadline(
    models_dir: Path, tmp_path: Path
) -> None:
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "4",
        "MEDSERVE_ENGINE_MAX_QUEUE": "4",
        "MEDSERVE_CASES_ENABLED": "false",
        "MEDSERVE_SERVER_DRAIN_TIMEOUT_S": str(DRAIN_S),
    }
    with start_server(tmp_path, env) as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        # Several long prompts: greedy decoding may still reach EOS early on one of them.
        long_runs: list[dict[str, Any]] = [{} for _ in LONG_PROMPTS]
        long_run = long_runs[0]
        short_run: dict[str, Any] = {}
        threads = [
            *(
                threading.Thread(target=_stream, args=(server.base_url, prompt, 4000, record))
                for prompt, record in zip(LONG_PROMPTS, long_runs, strict=True)
            ),
            threading.Thread(
                target=_stream,
                args=(server.base_url, "Name three primary colours.", 24, short_run),
            ),
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: long_run.get("events", 0) > 3, 60, "the long stream to start")
        wait_until(
            lambda: model_stats(server, BUNDLED_MODEL)["in_flight"] == len(threads),
            30,
            "every stream in flight",
        )
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # New connections are refused at once (the listening socket is closed).
        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(refused, 2, "new connections to be refused")
        for thread in threads:
            thread.join(DRAIN_S + 30)
        exit_code = server.process.wait(DRAIN_S + 30)
        exited_after = time.monotonic() - signalled

    assert short_run["last"] == "[DONE]" and "error" not in short_run, short_run
    # Streams still producing at the deadline were cut there, without [DONE].
    cut = [r for r in long_runs if r["last"] != "[DONE]"]
    assert cut, long_runs
    assert all(DRAIN_S - 0.5 <= r["ended"] - signalled <= DRAIN_S + 5 for r in cut), long_runs
    # uvicorn re-raises the SIGTERM once shut down, so the exit status says "terminated by
    # SIGTERM", which systemd counts as a clean stop; the log shows the shutdown completed.
    assert exit_code in (0, -signal.SIGTERM) and exited_after <= DRAIN_S + 15, (
        exit_code,
        exited_after,
    )
    log = server.log()
    assert "timeout graceful shutdown exceeded" in log
    assert "Application shutdown complete" in log


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_bad_drain_timeout_is_a_configuration_error(value: str) -> None:
    from medserve.server.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="drain_timeout_s"):
        load_settings(env={"MEDSERVE_SERVER_DRAIN_TIMEOUT_S": value})
