"""The server's egress guard: which destinations it allows, and that it refuses the rest.

The hook itself is installed in a child process: an audit hook can never be removed, and the
test process must stay as it was for the other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from medserve.server.egress_guard import destination_allowed, lookup_allowed


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.8.9.1",
        "::1",
        "localhost",
        "LOCALHOST",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        None,
    ],
)
def test_loopback_destinations_are_allowed(host: str | None) -> None:
    assert destination_allowed(host)


@pytest.mark.parametrize(
    "host", ["192.0.2.1", "10.0.0.5", "8.8.8.8", "2001:db8::1", "example.org", "169.254.169.254"]
)
def test_other_destinations_are_refused(host: str) -> None:
    assert not destination_allowed(host)


def test_numeric_lookups_pass_but_names_do_not() -> None:
    # A numeric lookup sends no packet (the connect after it is checked); a name may hit DNS.
    assert lookup_allowed("10.0.0.5")
    assert lookup_allowed("localhost")
    assert not lookup_allowed("updates.example.com")
    assert not lookup_allowed(b"hub.example.org")


CHILD = r"""
import asyncio, json, socket, sys
from medserve.server import egress_guard

egress_guard.install(allowed_hosts=["medserve.hospital.internal"])

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return type(exc).__name__

a, b = socket.socketpair()
a.sendall(b"x")
listener = socket.create_server(("127.0.0.1", 0))
results = {
    "unix_socketpair": b.recv(1) == b"x",
    "loopback": attempt(lambda: socket.create_connection(listener.getsockname(), 2).close()),
    "remote": attempt(lambda: socket.create_connection(("192.0.2.1", 443), 2)),
    "remote_connect_ex": attempt(lambda: socket.socket().connect_ex(("192.0.2.1", 443))),
    "dns": attempt(lambda: socket.gethostbyname("telemetry.example.org")),
    "allowed_name": egress_guard.destination_allowed("medserve.hospital.internal"),
    "loop": attempt(lambda: asyncio.run(asyncio.open_connection("192.0.2.1", 80))),
}
# Once added, an audit hook stays: a later install cannot widen the rules to everything.
egress_guard.install(allowed_hosts=[])
results["remote_after_reinstall"] = attempt(lambda: socket.create_connection(("10.9.9.9", 80), 2))
print(json.dumps(results))
"""


def test_installed_guard_refuses_and_logs_in_a_child_process() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results == {
        "unix_socketpair": True,
        "loopback": "ok",
        "remote": "EgressBlocked",
        "remote_connect_ex": "EgressBlocked",
        "dns": "EgressBlocked",
        "allowed_name": True,
        "loop": "EgressBlocked",
        "remote_after_reinstall": "EgressBlocked",
    }
    # Not configured logging in the child: structlog's default still prints the event name.
    assert completed.stderr.count("egress_blocked") + completed.stdout.count("egress_blocked") >= 5


_WORKER_PROBE = """
import json, socket
from medserve.accel import worker
from medserve.server import egress_guard
ours, theirs = socket.socketpair()
theirs.close()  # the server is gone before it configured us: the worker exits 1
code = worker.main(["--fd", str(ours.detach())])
try:
    socket.create_connection(("192.0.2.1", 80), timeout=2)
    outcome = "connected"
except egress_guard.EgressBlocked:
    outcome = "blocked"
except OSError as exc:
    outcome = "network error " + type(exc).__name__
print(json.dumps({"code": code, "installed": egress_guard.installed(), "outcome": outcome}))
"""


def test_engine_workers_install_the_guard_before_anything_else() -> None:
    """Engine libraries run in the worker, so it needs the same wall as the server."""
    result = subprocess.run(
        [sys.executable, "-c", _WORKER_PROBE], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"code": 1, "installed": True, "outcome": "blocked"}
