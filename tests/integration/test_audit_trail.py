"""The audit trail end to end: a real `medserve serve` (case index, no LLM) writes one record
per access to patient data -- who, from where, which route and action, which cases as keyed
HMACs, the status -- and never a raw case id or any text; `medserve audit verify` accepts the
trail and rejects copies with an edit, a deletion or a reordering; rotation keeps the chain; and
when the trail cannot be written, patient data is not served (503)."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_auth_scopes import bearer, create_key, medserve
from tests.server_process import ServerProcess

SECRET_TEXT = "Patient Zhang Wei, 67, crushing chest pain radiating to the left arm"
CASES = [
    {"id": "MRN-778812", "text": SECRET_TEXT, "age": 67},
    {"id": "MRN-778813", "text": "Itchy rash on both forearms after gardening.", "age": 30},
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("audit_home")
    keys_file = home / "keys.json"
    writer = create_key(keys_file, "emr-ingest", "cases:write,cases:read,embeddings")
    reader = create_key(keys_file, "ward-viewer", "cases:read")
    env = {
        "MEDSERVE_ENGINE_ENABLED": "false",
        "MEDSERVE_CASES_DATA_DIR": str(home / "cases"),
        "MEDSERVE_AUTH_KEYS_FILE": str(keys_file),
        "MEDSERVE_AUDIT_DIR": str(home / "audit"),
    }
    with ServerProcess.start(tmp_path_factory.mktemp("audit_log"), env=env) as server:
        yield {"server": server, "audit": home / "audit", "writer": writer, "reader": reader}


def _records(audit_dir: Path) -> list[dict[str, Any]]:
    files = [*sorted(audit_dir.glob("audit-*.jsonl")), audit_dir / "audit.jsonl"]
    return [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]


def _case_hmac(audit_dir: Path, case_id: str) -> str:
    key = bytes.fromhex((audit_dir / "case-id.key").read_text().strip())
    return hmac.new(key, case_id.encode(), hashlib.sha256).hexdigest()[:32]


def _send(rig: dict[str, Any], method: str, path: str, key: str, body: Any = None) -> int:
    response = httpx.request(
        method,
        rig["server"].base_url + path,
        json=body,
        headers=bearer(rig[key][1]),
        timeout=120,
    )
    return response.status_code


def test_each_access_leaves_one_record_without_ids_or_text(rig: dict[str, Any]) -> None:
    audit_dir: Path = rig["audit"]
    before = len(_records(audit_dir)) if (audit_dir / "audit.jsonl").exists() else 0
    assert _send(rig, "POST", "/v1/cases", "writer", {"cases": CASES}) == 200
    assert _send(rig, "GET", "/v1/cases/MRN-778812", "reader") == 200
    assert _send(rig, "GET", "/v1/cases/MRN-000000", "reader") == 404
    assert _send(rig, "POST", "/v1/cases/search", "reader", {"text": "chest pain", "k": 2}) == 200
    assert _send(rig, "POST", "/v1/embeddings", "writer", {"input": SECRET_TEXT}) == 200
    assert _send(rig, "DELETE", "/v1/cases/MRN-778813", "writer") == 200
    # not patient data: no record
    assert httpx.get(rig["server"].base_url + "/health").status_code == 200
    # refused before any access: no record (the access log has it)
    assert _send(rig, "POST", "/v1/cases", "reader", {"cases": CASES}) == 403

    records = _records(audit_dir)[before:]
    assert [(r["action"], r["status"]) for r in records] == [
        ("case.write", 200),
        ("case.read", 200),
        ("case.read", 404),
        ("case.search", 200),
        ("embeddings.create", 200),
        ("case.delete", 200),
    ]
    first, second = _case_hmac(audit_dir, "MRN-778812"), _case_hmac(audit_dir, "MRN-778813")
    assert records[0]["cases"] == [first, second]
    assert records[1]["cases"] == [first]
    assert records[2]["cases"] == [_case_hmac(audit_dir, "MRN-000000")]
    assert set(records[3]["cases"]) == {first, second}  # the cases the search returned
    assert records[4]["cases"] == [] and records[5]["cases"] == [second]
    writer_id, reader_id = rig["writer"][0], rig["reader"][0]
    assert [r["key_id"] for r in records] == [writer_id, reader_id, reader_id, reader_id] + [
        writer_id
    ] * 2
    assert records[1]["key_name"] == "ward-viewer" and records[1]["client"] == "127.0.0.1"
    assert records[1]["route"] == "/v1/cases/{case_id}" and records[1]["method"] == "GET"

    raw = (audit_dir / "audit.jsonl").read_text()
    for leak in ("MRN-7788", "Zhang", "chest", "rash", rig["writer"][1], rig["reader"][1]):
        assert leak not in raw
    assert oct((audit_dir / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
    assert oct((audit_dir / "case-id.key").stat().st_mode & 0o777) == "0o600"


def test_verify_accepts_the_trail_and_rejects_tampered_copies(
    rig: dict[str, Any], tmp_path: Path
) -> None:
    audit_dir: Path = rig["audit"]
    for _ in range(3):
        assert _send(rig, "GET", "/v1/cases/MRN-778812", "reader") == 200
    result = medserve("audit", "--dir", str(audit_dir), "verify")
    assert "ok:" in result.stdout, result.stdout

    lines = (audit_dir / "audit.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) >= 4
    tampered = {
        "edit": [*lines[:1], lines[1].replace('"status":200', '"status":500'), *lines[2:]],
        "delete": [*lines[:1], *lines[2:]],
        "reorder": [lines[1], lines[0], *lines[2:]],
    }
    assert tampered["edit"] != lines
    for name, content in tampered.items():
        copy = tmp_path / f"{name}.jsonl"
        copy.write_text("".join(content))
        result = medserve("audit", "verify", "--file", str(copy), check=False)
        assert result.returncode == 1 and "BROKEN" in result.stdout, (name, result.stdout)

    # truncation: the remaining chain is intact, so only a head noted earlier reveals it
    head = json.loads(lines[-1])["hash"]
    copy = tmp_path / "truncated.jsonl"
    copy.write_text("".join(lines[:-2]))
    assert medserve("audit", "verify", "--file", str(copy)).returncode == 0
    result = medserve("audit", "verify", "--file", str(copy), "--expect-head", head, check=False)
    assert result.returncode == 1 and "not in the trail" in result.stdout


def test_rotation_while_serving_keeps_one_chain(rig: dict[str, Any]) -> None:
    audit_dir: Path = rig["audit"]
    assert _send(rig, "GET", "/v1/cases/MRN-778812", "reader") == 200
    result = medserve("audit", "--dir", str(audit_dir), "rotate")
    assert "rotated to audit-" in result.stdout
    assert _send(rig, "GET", "/v1/cases/MRN-778812", "reader") == 200
    assert len(list(audit_dir.glob("audit-*.jsonl"))) >= 1
    new_file = (audit_dir / "audit.jsonl").read_text().splitlines()
    assert json.loads(new_file[0])["action"] == "audit.rotated"
    assert json.loads(new_file[-1])["action"] == "case.read"
    result = medserve("audit", "--dir", str(audit_dir), "verify")
    assert "ok:" in result.stdout and "file(s)" in result.stdout


def test_patient_data_is_not_served_when_the_trail_cannot_be_written(rig: dict[str, Any]) -> None:
    audit_dir: Path = rig["audit"]
    current = audit_dir / "audit.jsonl"
    saved = audit_dir / "saved.jsonl.bak"
    shutil.move(current, saved)
    current.mkdir()  # opening the trail now fails
    try:
        response = httpx.get(
            rig["server"].base_url + "/v1/cases/MRN-778812",
            headers=bearer(rig["reader"][1]),
            timeout=60,
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "audit_unavailable"
        assert SECRET_TEXT not in response.text
        assert httpx.get(rig["server"].base_url + "/health").status_code == 200
    finally:
        current.rmdir()
        shutil.move(saved, current)
    assert _send(rig, "GET", "/v1/cases/MRN-778812", "reader") == 200
    assert "ok:" in medserve("audit", "--dir", str(audit_dir), "verify").stdout
