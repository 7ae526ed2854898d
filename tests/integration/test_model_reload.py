"""Reload without downtime: a real `medserve serve` on versions made with ModelStore, under load.

v1 = the bundled int8 folder, v2 = the fp16 one, v3 = a damaged folder (its IR does not load).
Four client loops (streaming and not) run across every switch; not one request may fail.
A long stream started before a switch must finish on the old version, requests after it are
answered by the new one (``system_fingerprint`` / ``version``), the old worker process must be
gone once drained, and /ready must stay 200 all along.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from medserve.models.versions import ModelStore

from tests.conftest import BUNDLED_MODEL
from tests.server_process import ServerProcess

NAME = "ward-llm"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


def create_key(keys_file: Path, scopes: str) -> str:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "medserve.server.cli", "keys", "--keys-file", str(keys_file)),
            *("create", "--name", scopes.replace(",", "-"), "--scopes", scopes),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return next(line for line in out.splitlines() if line.startswith("msk_"))


def worker_pids(server_pid: int) -> set[int]:
    """Live child processes of the server (its engine workers)."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == server_pid and fields[0] != "Z":
                children.add(int(entry.name))
    return children


def wait_for(condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


@dataclass
class Load:
    """Client loops sending chat completions until stopped; every outcome is kept."""

    base_url: str
    token: str
    failures: list[str] = field(default_factory=list)
    fingerprints: list[tuple[float, str | None]] = field(default_factory=list)  # (sent at, fp)
    done: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self, loops: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._loop, args=(i % 2 == 0,)) for i in range(loops)]
        for thread in threads:
            thread.start()
        return threads

    def _loop(self, stream: bool) -> None:
        with httpx.Client(base_url=self.base_url, headers=self._headers(), timeout=60) as client:
            while not self._stop.is_set():
                # Keyed by when the request was sent: one sent before a switch may still
                # finish on the old worker, which is the point of draining.
                sent_at = time.monotonic()
                try:
                    fingerprint = (stream_chat if stream else chat)(client, QUESTION, 6)
                    self.fingerprints.append((sent_at, fingerprint))
                    self.done += 1
                except Exception as exc:  # every failure is a test failure, kept for the report
                    self.failures.append(f"{type(exc).__name__}: {exc}")

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def stop(self, threads: list[threading.Thread]) -> None:
        self._stop.set()
        for thread in threads:
            thread.join(60)


def chat(client: httpx.Client, messages: list[dict[str, str]], max_tokens: int) -> str | None:
    response = client.post(
        "/v1/chat/completions",
        json={"model": NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    return body["system_fingerprint"]


def stream_chat(
    client: httpx.Client, messages: list[dict[str, str]], max_tokens: int
) -> str | None:
    """The stream's fingerprint; asserts every event is a chunk and the stream ends in [DONE]."""
    body = {"model": NAME, "messages": messages, "max_tokens": max_tokens, "stream": True}
    body["temperature"] = 0
    fingerprints = set()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        fingerprints.add(chunk["system_fingerprint"])
    assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(fingerprints) == 1, fingerprints
    return fingerprints.pop()


@pytest.fixture(scope="module")
def store(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    fp16 = models_dir / f"{BUNDLED_MODEL}-fp16"
    if not (fp16 / "medserve.json").is_file():
        pytest.fail(f"{fp16.name} not prepared; run `medserve setup`", pytrace=False)
    root = tmp_path_factory.mktemp("reload")
    store = ModelStore(root / "models")
    store.install(models_dir / BUNDLED_MODEL, NAME, "v1", activate=True)
    store.install(fp16, NAME, "v2")
    # v3: a complete-looking folder whose IR is damaged, so only the worker can find out.
    damaged = root / "damaged"
    damaged.mkdir()
    for path in (models_dir / BUNDLED_MODEL).iterdir():
        if path.name != "openvino_model.bin":
            shutil.copy(path, damaged / path.name)
    (damaged / "openvino_model.xml").write_text("<net name='damaged'", encoding="utf-8")
    store.install(damaged, NAME, "v3")
    return store


@pytest.fixture(scope="module")
def server(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("reload_log")
    keys_file = log_dir / "keys.json"
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(store.models_dir),
        "MEDSERVE_ENGINE_MODEL": NAME,
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "6",
        "MEDSERVE_ENGINE_KV_CACHE_GB": "1",
        "MEDSERVE_CASES_ENABLED": "false",
        "MEDSERVE_AUTH_KEYS_FILE": str(keys_file),
        "MEDSERVE_SERVER_DRAIN_TIMEOUT_S": "60",
        "MEDSERVE_SERVER_DOCS": "true",
    }
    tokens = {"admin": create_key(keys_file, "admin"), "chat": create_key(keys_file, "chat")}
    with ServerProcess.start(log_dir, env=env) as running:
        running.tokens = tokens  # type: ignore[attr-defined]
        yield running


def admin(server: ServerProcess) -> dict[str, str]:
    return {"authorization": f"Bearer {server.tokens['admin']}"}  # type: ignore[attr-defined]


def served_version(server: ServerProcess) -> str | None:
    response = httpx.get(
        f"{server.base_url}/v1/models/{NAME}",
        headers={"authorization": f"Bearer {server.tokens['chat']}"},  # type: ignore[attr-defined]
    )
    assert response.status_code == 200
    return response.json()["version"]


def watch_ready(server: ServerProcess, stop: threading.Event, statuses: list[int]) -> None:
    while not stop.is_set():
        statuses.append(httpx.get(server.base_url + "/ready", timeout=10).status_code)
        time.sleep(0.1)


def test_switch_under_load_by_http_then_sighup(server: ServerProcess, store: ModelStore) -> None:
    chat_token = server.tokens["chat"]  # type: ignore[attr-defined]
    assert served_version(server) == "v1"
    [first_worker] = worker_pids(server.process.pid)
    load = Load(server.base_url, chat_token)
    threads = load.run(4)
    stop_ready, ready_statuses = threading.Event(), []
    watcher = threading.Thread(target=watch_ready, args=(server, stop_ready, ready_statuses))
    watcher.start()
    try:
        wait_for(lambda: load.done >= 4)
        # 1) activate v2 and reload over HTTP while a long stream runs on v1
        long_result: list[str | None] = []
        client = httpx.Client(base_url=server.base_url, timeout=120)
        client.headers["authorization"] = f"Bearer {chat_token}"
        long_stream = threading.Thread(
            target=lambda: long_result.append(stream_chat(client, LONG, 300))
        )
        long_stream.start()
        wait_for(lambda: httpx.get(server.base_url + "/ready").json()["in_flight"][NAME] >= 1)
        store.activate(NAME, "v2")
        response = httpx.post(server.base_url + "/admin/reload", headers=admin(server), timeout=120)
        switched_at = time.monotonic()
        assert response.status_code == 200, response.text
        report = response.json()["models"][NAME]
        assert report["status"] == "switched" and report["error"] is None
        assert report["from"].endswith("/.versions/ward-llm/v1")
        assert report["to"].endswith("/.versions/ward-llm/v2")
        assert served_version(server) == "v2"
        # The long stream is still running on the old worker, which therefore still lives.
        assert long_stream.is_alive(), f"the long stream ended before the switch: {long_result}"
        assert first_worker in worker_pids(server.process.pid)
        long_stream.join(120)
        client.close()
        assert long_result == ["v1"]  # finished, complete, on the version it started on
        wait_for(lambda: first_worker not in worker_pids(server.process.pid))
        [second_worker] = worker_pids(server.process.pid)
        wait_for(lambda: any(t > switched_at and fp == "v2" for t, fp in load.fingerprints))
        assert all(fp == "v2" for t, fp in load.fingerprints if t > switched_at)

        # 2) roll back to v1 and reload by SIGHUP
        store.rollback(NAME)
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: served_version(server) == "v1", timeout_s=60)
        switched_at = time.monotonic()
        wait_for(lambda: second_worker not in worker_pids(server.process.pid))
        assert len(worker_pids(server.process.pid)) == 1
        wait_for(lambda: any(t > switched_at and fp == "v1" for t, fp in load.fingerprints))
        assert server.process.poll() is None  # SIGHUP did not kill it
    finally:
        load.stop(threads)
        stop_ready.set()
        watcher.join(30)
    assert load.failures == []
    assert load.done >= 20
    assert ready_statuses and set(ready_statuses) == {200}
    assert "model_reloaded" in server.log() and '"trigger": "sighup"' in server.log()


def test_damaged_version_fails_and_the_old_one_keeps_serving(
    server: ServerProcess, store: ModelStore
) -> None:
    before = worker_pids(server.process.pid)
    current = served_version(server)
    store.activate(NAME, "v3")
    try:
        response = httpx.post(server.base_url + "/admin/reload", headers=admin(server), timeout=120)
    finally:
        store.activate(NAME, current or "v1")
    assert response.status_code == 500
    body = response.json()
    assert body["error"]["code"] == "reload_failed" and body["error"]["type"] == "server_error"
    result = body["models"][NAME]
    assert result["status"] == "failed" and f"model {NAME!r}" in result["error"]
    assert result["to"].endswith("/v3")
    assert served_version(server) == current
    wait_for(lambda: worker_pids(server.process.pid) == before)  # the failed worker is reaped
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        client.headers["authorization"] = f"Bearer {server.tokens['chat']}"  # type: ignore[attr-defined]
        assert chat(client, QUESTION, 6) == current


def test_nothing_changed_is_unchanged_and_starts_nothing(server: ServerProcess) -> None:
    before = worker_pids(server.process.pid)
    response = httpx.post(server.base_url + "/admin/reload", headers=admin(server), timeout=60)
    assert response.status_code == 200
    assert response.json()["models"][NAME]["status"] == "unchanged"
    assert worker_pids(server.process.pid) == before


def test_reload_needs_the_admin_scope(server: ServerProcess) -> None:
    chat_only = {"authorization": f"Bearer {server.tokens['chat']}"}  # type: ignore[attr-defined]
    response = httpx.post(server.base_url + "/admin/reload", headers=chat_only)
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert httpx.post(server.base_url + "/admin/reload").status_code == 401


def test_reload_is_documented(server: ServerProcess) -> None:
    schema = httpx.get(server.base_url + "/schema/openapi.json", headers=admin(server))
    assert schema.status_code == 200
    operation = schema.json()["paths"]["/admin/reload"]["post"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ReloadReport"
    )
