"""The test network guard refuses non-loopback connections before any packet leaves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.server_process import NETGUARD


@pytest.mark.parametrize("address", [("192.0.2.1", 443), ("10.1.2.3", 80)])
def test_non_loopback_connect_is_refused_in_this_process(address: tuple[str, int]) -> None:
    with socket.socket() as sock, pytest.raises(OSError, match="only connect to loopback"):
        sock.connect(address)


def test_loopback_is_allowed() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_guard_is_active_in_subprocesses() -> None:
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.1', 443), timeout=1)\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(NETGUARD)}
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert completed.stdout.strip() == "NonLoopbackConnection"
