"""Proof under faults, on one real server with the bundled model.

- 64 concurrent streams for ``MEDSERVE_SOAK_SECONDS`` (30 s in CI), about a third of them cut
  off by the client mid-stream: afterwards nothing is in flight, the KV cache reads 0, and the
  server and worker hold no more file descriptors or threads than before.
- Clients that trickle their headers (slow loris) or send nothing do not slow anyone else, and
  are cut off at ``server.header_timeout_s``.
- kill -9 of the worker in the middle of a stream: the stream ends at once with an error event,
  the worker comes back, and the next request is served.  (engine_contract.py covers the same
  kill for a non-streamed request, on every engine.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BUNDLED_MODEL
from tests.server_process import ServerProcess
from tests.soak.server import start_server
from tests.soak.support import (
    LONG_SOAK,
    SOAK_SECONDS,
    model_stats,
    open_fds,
    sse_payloads,
    threads,
    wait_until,
)

STREAMS = 64
HEADER_TIMEOUT_S = 20.0 if LONG_SOAK else 3.0
TRICKLE_S = 30.0 if LONG_SOAK else 6.0
PROMPTS = [
    "Name three primary colours.",
    "Write a very long essay about medicine.",
    "List the bones of the human arm.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "8",
        "MEDSERVE_ENGINE_MAX_QUEUE": str(STREAMS),
        # off so that freed KV blocks read as zero usage afterwards
        "MEDSERVE_ENGINE_ENABLE_PREFIX_CACHING": "false",
        "MEDSERVE_CASES_ENABLED": "false",
        "MEDSERVE_SERVER_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    }
    with start_server(tmp_path_factory.mktemp("soak"), env) as running:
        yield running


def _idle(server: ServerProcess) -> bool:
    stats = model_stats(server, BUNDLED_MODEL)
    return stats["in_flight"] == 0 and stats["engine_requests"] == 0


def _body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": BUNDLED_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
    }


async def _one_stream(client: httpx.AsyncClient, rng: random.Random, outcomes: Counter) -> None:
    disconnect_after = rng.randint(1, 6) if rng.random() < 0.35 else None
    body = _body(rng.choice(PROMPTS), rng.randint(4, 24))
    events = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            outcomes[f"status {response.status_code}"] += 1
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                outcomes["completed"] += 1
                return
            if '"error"' in line:
                outcomes["error event"] += 1
                return
            events += 1
            if disconnect_after is not None and events >= disconnect_after:
                outcomes["disconnected"] += 1
                return  # leaving the block closes the connection mid-stream
    outcomes["ended without [DONE]"] += 1


async def _soak(base_url: str, seconds: float) -> Counter:
    outcomes: Counter = Counter()
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)

    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < end:
                await _one_stream(client, rng, outcomes)

        await asyncio.gather(*(worker(seed) for seed in range(STREAMS)))
    return outcomes


def test_64_streams_with_random_disconnects_leave_nothing_behind(server: ServerProcess) -> None:
    worker_pid = model_stats(server, BUNDLED_MODEL)["pid"]
    asyncio.run(_soak(server.base_url, 3))  # warm-up: pools, executor threads, KV blocks
    wait_until(lambda: _idle(server), 60, "the warm-up to drain")
    before = {
        "server fds": open_fds(server.process.pid),
        "worker fds": open_fds(worker_pid),
        "server threads": threads(server.process.pid),
        "worker threads": threads(worker_pid),
    }

    outcomes = asyncio.run(_soak(server.base_url, SOAK_SECONDS))

    assert set(outcomes) == {"completed", "disconnected"}, outcomes
    assert outcomes["completed"] >= STREAMS and outcomes["disconnected"] >= STREAMS // 4, outcomes
    wait_until(lambda: _idle(server), 60, "every stream to leave the engine")
    stats = model_stats(server, BUNDLED_MODEL)
    assert stats["running_requests"] == 0 and stats["kv_cache_usage"] == 0.0, stats
    assert stats["pid"] == worker_pid and server.process.poll() is None

    def counts() -> dict[str, int]:
        return {
            "server fds": open_fds(server.process.pid),
            "worker fds": open_fds(worker_pid),
            "server threads": threads(server.process.pid),
            "worker threads": threads(worker_pid),
        }

    # Closed client sockets leave the server's table a moment after the last response.
    with contextlib.suppress(AssertionError):
        wait_until(lambda: all(counts()[k] <= v for k, v in before.items()), 15, "fds")
    after = counts()
    assert all(after[k] <= v for k, v in before.items()), (before, after, outcomes)


def _trickler(port: int, stop: threading.Event, closed_after: list[float]) -> None:
    """Sends one header byte every 0.5 s until the server closes the connection."""
    started = time.monotonic()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 500
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for byte in request:
            if stop.is_set():
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                try:
                    if sock.recv(1024) == b"":
                        break
                except OSError:
                    break
        closed_after.append(time.monotonic() - started)


def _silent(port: int, closed_after: list[float]) -> None:
    """Connects and sends nothing at all."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=TRICKLE_S + 10) as sock:
        with contextlib.suppress(OSError):
            sock.recv(1)
        closed_after.append(time.monotonic() - started)


def test_slow_header_clients_do_not_block_others(server: ServerProcess) -> None:
    port = int(server.base_url.rsplit(":", 1)[1])
    fds_before = open_fds(server.process.pid)
    stop = threading.Event()
    trickled: list[float] = []
    silent: list[float] = []
    slow = [threading.Thread(target=_trickler, args=(port, stop, trickled)) for _ in range(40)]
    slow += [threading.Thread(target=_silent, args=(port, silent)) for _ in range(10)]
    for thread in slow:
        thread.start()
    try:
        # Everyone else is served as usual while the slow clients hang on.
        latencies = []
        started = time.monotonic()
        while time.monotonic() - started < TRICKLE_S:
            t0 = time.monotonic()
            assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.2)
        chat = httpx.post(
            server.base_url + "/v1/chat/completions",
            json={**_body(PROMPTS[0], 8), "stream": False},
            timeout=60,
        )
        assert chat.status_code == 200
    finally:
        stop.set()
        for thread in slow:
            thread.join(TRICKLE_S + 15)
    assert max(latencies) < 1.0, max(latencies)
    # ... and the server cut every slow connection at its header deadline, not later.
    assert len(trickled) == 40 and len(silent) == 10
    assert all(HEADER_TIMEOUT_S - 0.5 <= t <= HEADER_TIMEOUT_S + 2.5 for t in trickled + silent), (
        trickled,
        silent,
    )
    wait_until(lambda: open_fds(server.process.pid) <= fds_before, 10, "the slow sockets to close")


def test_killed_worker_mid_stream_errors_at_once_and_recovers(server: ServerProcess) -> None:
    before = model_stats(server, BUNDLED_MODEL)
    body = _body("Write a very long essay about medicine.", 2000)
    with httpx.stream(
        "POST", server.base_url + "/v1/chat/completions", json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        payloads = sse_payloads(response.iter_lines())
        for _ in range(5):
            next(payloads)
        killed_at = time.monotonic()
        os.kill(before["pid"], signal.SIGKILL)
        rest = list(payloads)
        ended_after = time.monotonic() - killed_at
    errors = [p for p in rest if isinstance(p, dict) and "error" in p]
    assert errors and errors[0]["error"]["code"] == "backend_error", rest[-3:]
    assert rest[-1] == "[DONE]"
    assert ended_after < 5.0, ended_after
    wait_until(
        lambda: httpx.get(server.base_url + "/ready", timeout=5).status_code == 200,
        180,
        "the worker to restart",
    )
    after = model_stats(server, BUNDLED_MODEL)
    assert after["pid"] != before["pid"] and after["restarts"] == before["restarts"] + 1
    with httpx.stream(
        "POST", server.base_url + "/v1/chat/completions", json=_body(PROMPTS[0], 8), timeout=60
    ) as response:
        assert list(sse_payloads(response.iter_lines()))[-1] == "[DONE]"
    assert server.process.poll() is None
