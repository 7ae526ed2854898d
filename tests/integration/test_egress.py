"""An outbound connection attempted inside a running server is refused and logged.

The attempt has to come from inside the server process, but the product offers no way to
make it: no debug route, no plugin hook (either would be an attack surface on a box that holds
patient data).  So the test starts the server through a launcher that runs the real
`medserve serve` entry point in its main thread and, in a second thread, plays the part of a
library phoning home once the server is up: a TCP connect, a DNS lookup, a UDP datagram and a
connect through the server's own event loop.  The launcher exists only in this file.

The test network guard (tests/netguard) is left off in this one process: it would refuse the
connects first, and the point is to see the product's own guard do it.  The suite also runs
in a loopback-only network namespace (.ci/run), so nothing could leave even if both failed;
which is why the test checks *how* each attempt failed (EgressBlocked), not only that it did.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx

from tests.soak.server import start_server

PROBE = r"""
import asyncio, gc, json, os, socket, sys, threading, time

from medserve.server import cli, egress_guard

def server_loop():
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        loops = [o for o in gc.get_objects() if type(o).__name__ == "GuardedLoop"]
        if loops and loops[0].is_running():
            return loops[0]
        time.sleep(0.1)
    raise RuntimeError("the server's event loop never started")

def attempt(fn):
    try:
        fn()
        return "connected"
    except OSError as exc:
        return type(exc).__name__

def loopback_attempt():
    # The loop runs before uvicorn has bound its socket: a refusal then means "not listening
    # yet", not "blocked", so retry refusals for a while; EgressBlocked is returned at once.
    port = int(os.environ["MEDSERVE_SERVER_PORT"])
    deadline = time.monotonic() + 60
    while True:
        result = attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close())
        if result != "ConnectionRefusedError" or time.monotonic() > deadline:
            return result
        time.sleep(0.2)

def probe():
    loop = server_loop()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    results = {
        "guard_installed": egress_guard.installed(),
        "tcp_connect": attempt(lambda: socket.create_connection(("192.0.2.10", 443), timeout=2)),
        "dns_lookup": attempt(lambda: socket.getaddrinfo("telemetry.example.com", 443)),
        "udp_sendto": attempt(lambda: udp.sendto(b"x", ("198.51.100.7", 53))),
        "event_loop_connect": attempt(
            lambda: asyncio.run_coroutine_threadsafe(
                loop.create_connection(asyncio.Protocol, "203.0.113.5", 80), loop
            ).result(10)
        ),
        "loopback_connect": loopback_attempt(),
    }
    with open(os.environ["EGRESS_PROBE_OUT"], "w") as out:
        json.dump(results, out)

threading.Thread(target=probe, daemon=True).start()
sys.exit(cli.main(["serve"]))
"""


def test_outbound_attempts_in_the_server_are_refused_and_logged(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    env = {
        "MEDSERVE_ENGINE_ENABLED": "false",
        "MEDSERVE_CASES_ENABLED": "false",
        "EGRESS_PROBE_OUT": str(out),
    }
    with start_server(
        tmp_path, env, command=[sys.executable, "-c", PROBE], netguard=False
    ) as server:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        results = json.loads(out.read_text())
        # The server carries on serving after refusing.
        assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
    assert results == {
        "guard_installed": True,
        "tcp_connect": "EgressBlocked",
        "dns_lookup": "EgressBlocked",
        "udp_sendto": "EgressBlocked",
        "event_loop_connect": "EgressBlocked",
        "loopback_connect": "connected",
    }
    events = [
        json.loads(line)
        for line in server.log().splitlines()
        if line.startswith("{") and '"egress_blocked"' in line
    ]
    assert sorted((e["operation"], e["host"]) for e in events) == [
        ("connect", "192.0.2.10"),
        ("connect", "203.0.113.5"),
        ("getaddrinfo", "telemetry.example.com"),
        ("sendto", "198.51.100.7"),
    ]
    assert all(e["level"] == "warning" for e in events)
