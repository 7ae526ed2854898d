"""Runs `medserve serve` as a real subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

NETGUARD = Path(__file__).parent / "netguard"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    @classmethod
    @contextlib.contextmanager
    def start(
        cls, log_dir: Path, env: dict[str, str], *, ready_timeout_s: float = 300.0
    ) -> Iterator[ServerProcess]:
        port = free_port()
        log_path = log_dir / f"server-{port}.log"
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MEDSERVE_")},
            **env,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")])
            ),
            "MEDSERVE_SERVER_PORT": str(port),
            "MEDSERVE_SERVER_HOST": "127.0.0.1",
        }
        if "MEDSERVE_HOME" in os.environ:
            full_env.setdefault("MEDSERVE_HOME", os.environ["MEDSERVE_HOME"])
        # Keys and audit trail per test server, unless a test sets them: an open install whatever
        # keys the developer's home holds, and no test records in the home's audit trail.
        full_env.setdefault("MEDSERVE_AUTH_KEYS_FILE", str(log_dir / f"keys-{port}.json"))
        full_env.setdefault("MEDSERVE_AUDIT_DIR", str(log_dir / f"audit-{port}"))
        # Nor any test document in the home's knowledge base.
        full_env.setdefault("MEDSERVE_KNOWLEDGE_DATA_DIR", str(log_dir / f"knowledge-{port}"))
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "medserve.server.cli", "serve"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        server = cls(process, f"http://127.0.0.1:{port}", log_path)
        try:
            server.wait_ready(ready_timeout_s)
            yield server
        finally:
            server.stop()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def kill(self) -> None:
        """kill -9: no shutdown hooks run, as in a power cut or an OOM kill."""
        self.process.kill()
        self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")
