"""Start `medserve serve` the way the fault, TLS and egress tests need it.

`tests.server_process.ServerProcess` covers plain HTTP with the test network guard; these tests
also need HTTPS clients, a different command (a launcher that probes the egress guard from
inside the server process) or a wrapper (a private tmpfs).  The process is still a real
server on a free 127.0.0.1 port, and `ServerProcess` still stops it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.server_process import NETGUARD, ServerProcess, free_port

SERVE = [sys.executable, "-m", "medserve.server.cli", "serve"]


def server_env(env: dict[str, str], port: int, *, netguard: bool = True) -> dict[str, str]:
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MEDSERVE_")},
        **env,
        "MEDSERVE_SERVER_PORT": str(port),
        "MEDSERVE_SERVER_HOST": "127.0.0.1",
    }
    if "MEDSERVE_HOME" in os.environ:
        full.setdefault("MEDSERVE_HOME", os.environ["MEDSERVE_HOME"])
    if netguard:
        full["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")])
        )
    return full


@contextlib.contextmanager
def start_server(
    log_dir: Path,
    env: dict[str, str],
    *,
    command: list[str] | None = None,
    scheme: str = "http",
    client: dict[str, Any] | None = None,
    netguard: bool = True,
    ready_timeout_s: float = 300.0,
) -> Iterator[ServerProcess]:
    """A running server; ``client`` holds the httpx options (verify, cert) for HTTPS."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    env = {
        # an open install (no keys) whatever ~/.medserve holds; audit kept out of the home
        "MEDSERVE_AUTH_KEYS_FILE": str(log_dir / "keys.json"),
        "MEDSERVE_AUDIT_DIR": str(log_dir / "audit"),
        **env,
    }
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command or SERVE,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=server_env(env, port, netguard=netguard),
        )
    server = ServerProcess(process, f"{scheme}://127.0.0.1:{port}", log_path)
    try:
        wait_ready(server, client or {}, ready_timeout_s)
        yield server
    finally:
        server.stop()


def wait_ready(server: ServerProcess, client: dict[str, Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.base_url + "/ready", timeout=2, **client).status_code == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"server not ready after {timeout_s} s:\n{server.log()}")
