"""Patient data under faults: a full disk, and a PHI canary in every field.

Disk full: the case database lives on a small tmpfs mounted in a private mount namespace
(``unshare -m``, which works as root and inside the loopback-only user namespace CI runs the
tests in; no loop device, no change to the host's mounts).  Cases are written until the disk is
full: that write answers 507 in the OpenAI error shape, the server keeps serving, and every
case acknowledged before it is still there, text intact, after a restart on the same disk.

PHI canary: one unique string sent in chat messages, case ids and texts, search and embedding
input, custom headers, query strings and a malformed body never appears in the server's
stdout/stderr, in /metrics or /metrics.json, or in the audit trail.  User-Agent carries it
after its first product token (the only part logged).  X-Request-ID is not in the list: the
access log records the client's correlation id by design.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BUNDLED_MODEL
from tests.server_process import ServerProcess
from tests.soak.server import SERVE, start_server

SMALL_DISK_KIB = 512
FREE_KIB = 192
"""A filler file leaves this much free, so the disk fills after a few small cases (embedding
large texts to fill it would take minutes on two cores)."""


def _cases_env(models_dir: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "2",
        "MEDSERVE_CASES_DATA_DIR": str(data_dir),
        **extra,
    }


@contextlib.contextmanager
def small_disk(mountpoint: Path) -> Iterator[list[str]]:
    """A nearly full tmpfs at ``mountpoint``, seen only by processes started with the
    returned command prefix (they join the helper's private mount namespace)."""
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        pytest.skip("needs unshare and nsenter (util-linux) for a private tmpfs")
    mountpoint.mkdir()
    helper = subprocess.Popen(
        [
            "unshare", "-m", "--propagation", "private", "sh", "-c",
            f"mount -t tmpfs -o size={SMALL_DISK_KIB}k medserve-small-disk {mountpoint} && "
            f"head -c {(SMALL_DISK_KIB - FREE_KIB) * 1024} /dev/zero > {mountpoint}/.filler && "
            "echo mounted && exec sleep 3600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert helper.stdout is not None
    if helper.stdout.readline().strip() != "mounted":
        helper.kill()
        pytest.skip(f"cannot mount a private tmpfs here: {helper.communicate()[1].strip()}")
    try:
        yield ["nsenter", "-t", str(helper.pid), "-m", "--"]
    finally:
        helper.kill()
        helper.wait(10)


def _case(case_id: str, text: str) -> dict[str, Any]:
    return {"id": case_id, "text": text, "department": "cardiology", "icd10": ["I21.9"]}


def _post_cases(server: ServerProcess, cases: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/cases", json={"cases": cases}, timeout=120)


def test_disk_full_is_507_and_loses_no_acknowledged_case(models_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "small-disk"
    with small_disk(data_dir) as enter:
        command = [*enter, *SERVE]
        env = _cases_env(models_dir, data_dir, MEDSERVE_ENGINE_ENABLED="false")
        acknowledged: dict[str, str] = {}
        with start_server(tmp_path, env, command=command) as server:
            full = None
            for batch in range(200):
                cases = [
                    _case(
                        f"case-{batch}-{i}",
                        f"Case {batch}-{i}: " + "chest pain, troponin up. " * 150,
                    )
                    for i in range(4)
                ]
                response = _post_cases(server, cases)
                if response.status_code != 200:
                    full = response
                    break
                acknowledged |= {c["id"]: c["text"] for c in cases}
            assert full is not None, "the small disk never filled up"
            assert full.status_code == 507, full.text
            error = full.json()["error"]
            assert error["code"] == "insufficient_storage" and error["type"] == "server_error"
            assert set(error) == {"message", "type", "param", "code"}
            assert len(acknowledged) >= 4, "the disk filled before anything was stored"
            print(f"{len(acknowledged)} cases stored before the disk was full")
            # Still serving: reads work, and so does the rest of the API.
            some_id = next(iter(acknowledged))
            assert httpx.get(f"{server.base_url}/v1/cases/{some_id}", timeout=30).status_code == 200
            assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
            assert "Traceback" not in server.log()
        # Restart on the same (still full) disk: every acknowledged case is there, intact.
        with start_server(tmp_path, env, command=command) as restarted:
            for case_id, text in acknowledged.items():
                got = httpx.get(f"{restarted.base_url}/v1/cases/{case_id}", timeout=30)
                assert got.status_code == 200, (case_id, got.text)
                assert got.json()["text"] == text
            failed_batch = f"case-{len(acknowledged) // 2}-0"
            assert httpx.get(f"{restarted.base_url}/v1/cases/{failed_batch}").status_code == 404


CANARY = "PHICANARY" + uuid.uuid4().hex[:12]


def _send_canary_everywhere(server: ServerProcess) -> None:
    url = server.base_url
    headers = {
        "X-Patient-Name": CANARY,
        "X-Emr-Note": f"note {CANARY}",
        # Only the first product token of User-Agent is logged; what follows is free text.
        "User-Agent": f"EMR-Connector/3.2 (ward 7; patient {CANARY}) {CANARY}/1",
    }
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        chat = {
            "model": BUNDLED_MODEL,
            "messages": [
                {"role": "system", "content": f"Patient {CANARY}."},
                {"role": "user", "content": f"Summarise the history of {CANARY}."},
            ],
            "max_tokens": 8,
            "stop": [CANARY],
        }
        assert http.post(f"/v1/chat/completions?mrn={CANARY}", json=chat).status_code == 200
        with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            assert r.status_code == 200
            r.read()
        prompt = {"model": BUNDLED_MODEL, "prompt": f"{CANARY} presents with", "max_tokens": 4}
        assert http.post("/v1/completions", json=prompt).status_code == 200
        case_id = f"{CANARY}-1"
        case = _case(case_id, f"{CANARY}, 54, admitted with chest pain.")
        assert http.post("/v1/cases", json={"cases": [case]}).status_code == 200
        assert http.get(f"/v1/cases/{case_id}?patient={CANARY}").status_code == 200
        assert http.get(f"/v1/cases/{CANARY}-missing").status_code == 404
        search = {"text": f"chest pain like {CANARY}", "k": 3}
        assert http.post("/v1/cases/search", json=search).status_code == 200
        assert http.post("/v1/cases/search", json={"case_id": case_id, "k": 3}).status_code == 200
        assert (
            http.post("/v1/embeddings", json={"input": [CANARY, f"{CANARY} x"]}).status_code == 200
        )
        # Refused requests too: a malformed body, an unknown field, an unknown route.
        assert (
            http.post(
                "/v1/chat/completions", content=f'{{"messages": "{CANARY}'.encode()
            ).status_code
            == 400
        )
        assert http.post("/v1/chat/completions", json={**chat, CANARY: 1}).status_code == 400
        assert http.get(f"/v1/{CANARY}").status_code == 404
        assert http.delete(f"/v1/cases/{case_id}").status_code == 200


def test_phi_canary_never_reaches_logs_metrics_or_audit(models_dir: Path, tmp_path: Path) -> None:
    env = _cases_env(models_dir, tmp_path / "cases")
    with start_server(tmp_path, env) as server:
        _send_canary_everywhere(server)
        exposed = {
            "/metrics": httpx.get(server.base_url + "/metrics", timeout=30).text,
            "/metrics.json": httpx.get(server.base_url + "/metrics.json", timeout=30).text,
        }
    exposed["server log"] = server.log()
    audit_dir = tmp_path / "audit"
    audit_files = (
        sorted(p for p in audit_dir.rglob("*") if p.is_file()) if audit_dir.exists() else []
    )
    for path in audit_files:
        exposed[f"audit {path.name}"] = path.read_bytes().decode("utf-8", errors="replace")
    # The places looked at are not empty: the requests were logged and (where the audit trail
    # exists) audited, only without their content.
    assert exposed["server log"].count('"request"') >= 12
    if audit_files:
        audit = "".join(text for name, text in exposed.items() if name.startswith("audit"))
        assert '"/v1/cases/{case_id}"' in audit and '"/v1/chat/completions"' in audit
    leaks = {name: text.count(CANARY) for name, text in exposed.items() if CANARY in text}
    assert leaks == {}, leaks
    assert CANARY.lower() not in exposed["server log"].lower()
