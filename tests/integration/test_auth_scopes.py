"""Scoped keys end to end: keys made with `medserve keys`, a real `medserve serve` (case index,
no LLM) over HTTP.  401 without a valid key, 403 for a missing scope, an expired key or a
foreign network, on every route but the probes; revoke and rotate take effect on the next
request without a restart; an open install warns, and closes once a key is created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from medserve.server.auth.store import editing

from tests.server_process import ServerProcess

CASE = {"id": "scope-case-1", "text": "Fever and productive cough for three days.", "age": 40}


def medserve(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The `medserve` CLI as an administrator runs it, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("MEDSERVE_")}
        | {"MEDSERVE_HOME": os.environ.get("MEDSERVE_HOME", str(Path.home() / ".medserve"))},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"medserve {' '.join(args)} failed:\n{result.stderr}")
    return result


def create_key(keys_file: Path, name: str, scopes: str, *extra: str) -> tuple[str, str]:
    """(key id, token) of a key made with `medserve keys create`."""
    out = medserve(
        "keys", "--keys-file", str(keys_file), "create", "--name", name, "--scopes", scopes, *extra
    ).stdout
    token = next(line for line in out.splitlines() if line.startswith("msk_"))
    key_id = next(line.split()[-1] for line in out.splitlines() if line.startswith("key id:"))
    return key_id, token


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    keys_file = tmp_path_factory.mktemp("auth_home") / "keys.json"
    made = {
        "reader": create_key(keys_file, "ward-viewer", "cases:read"),
        "writer": create_key(keys_file, "emr-ingest", "cases:write,cases:read"),
        "embed": create_key(keys_file, "search-ui", "embeddings"),
        "admin": create_key(keys_file, "it-admin", "admin,metrics"),
        "lan": create_key(keys_file, "lan-only", "cases:read", "--network", "10.0.0.0/8"),
        "expired": create_key(keys_file, "old-job", "cases:read", "--expires", "1h"),
    }
    with editing(keys_file) as records:  # the CLI refuses past dates; age this one by hand
        key_id = made["expired"][0]
        records[key_id] = msgspec.structs.replace(records[key_id], expires_at=time.time() - 5)
    made["file"] = (str(keys_file), "")
    return made


@pytest.fixture(scope="module")
def server(
    keys: dict[str, tuple[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("auth_data")
    env = {
        "MEDSERVE_ENGINE_ENABLED": "false",
        "MEDSERVE_CASES_DATA_DIR": str(data / "cases"),
        "MEDSERVE_AUTH_KEYS_FILE": keys["file"][0],
        "MEDSERVE_AUDIT_DIR": str(data / "audit"),
        "MEDSERVE_SERVER_DOCS": "true",
    }
    with ServerProcess.start(tmp_path_factory.mktemp("auth_log"), env=env) as srv:
        yield srv


def _call(server: ServerProcess, method: str, path: str, token: str | None) -> httpx.Response:
    body = {
        "/v1/cases": {"cases": [CASE]},
        "/v1/cases/search": {"text": "cough", "k": 1},
        "/v1/embeddings": {"input": "cough"},
    }.get(path)
    return httpx.request(
        method,
        server.base_url + path,
        json=body if method == "POST" else None,
        headers=bearer(token) if token else {},
        timeout=60,
    )


ROUTES = [
    ("POST", "/v1/cases"),
    ("GET", "/v1/cases/scope-case-1"),
    ("DELETE", "/v1/cases/nothing-here"),
    ("POST", "/v1/cases/search"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/metrics"),
    ("GET", "/schema/openapi.json"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_but_the_probes_needs_a_valid_key(
    server: ServerProcess, method: str, path: str
) -> None:
    for token in (None, "msk_00000000_not-a-real-secret", "wrong-format-token-123456"):
        response = _call(server, method, path, token)
        assert response.status_code == 401, (path, token, response.text)
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


def test_probes_stay_open(server: ServerProcess) -> None:
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/ready").status_code == 200


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("reader", {"/v1/cases/scope-case-1", "/v1/cases/search", "/schema/openapi.json"}),
        (
            "writer",
            {
                "/v1/cases",
                "/v1/cases/scope-case-1",
                "/v1/cases/nothing-here",
                "/v1/cases/search",
                "/schema/openapi.json",
            },
        ),
        ("embed", {"/v1/embeddings", "/v1/models", "/schema/openapi.json"}),
        # admin does not imply access to patient data
        ("admin", {"/metrics", "/schema/openapi.json"}),
    ],
)
def test_each_key_reaches_only_its_scopes(
    server: ServerProcess, keys: dict[str, tuple[str, str]], key: str, allowed: set[str]
) -> None:
    # the case exists, so reads are 200 (not 404) when allowed
    assert _call(server, "POST", "/v1/cases", keys["writer"][1]).status_code == 200
    for method, path in ROUTES:
        response = _call(server, method, path, keys[key][1])
        if path in allowed:
            assert response.status_code not in (401, 403), (key, path, response.text)
        else:
            assert response.status_code == 403, (key, path, response.text)
            error = response.json()["error"]
            assert error["type"] == "permission_error" and error["code"] == "insufficient_scope"
            assert keys[key][0] in error["message"]


def test_expired_key_and_foreign_network_are_403(
    server: ServerProcess, keys: dict[str, tuple[str, str]]
) -> None:
    response = _call(server, "GET", "/v1/cases/scope-case-1", keys["expired"][1])
    assert response.status_code == 403 and response.json()["error"]["code"] == "key_expired"
    # the test client comes from 127.0.0.1, outside 10.0.0.0/8
    response = _call(server, "GET", "/v1/cases/scope-case-1", keys["lan"][1])
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "network_not_allowed"


def test_revoke_and_rotate_take_effect_without_a_restart(
    server: ServerProcess, keys: dict[str, tuple[str, str]]
) -> None:
    keys_file = keys["file"][0]
    key_id, token = create_key(Path(keys_file), "short-lived", "cases:read")
    # a key created while the server runs works at once
    assert _call(server, "POST", "/v1/cases/search", token).status_code == 200

    out = medserve("keys", "--keys-file", keys_file, "rotate", key_id).stdout
    new_token = next(line for line in out.splitlines() if line.startswith("msk_"))
    assert _call(server, "POST", "/v1/cases/search", token).status_code == 401
    assert _call(server, "POST", "/v1/cases/search", new_token).status_code == 200

    medserve("keys", "--keys-file", keys_file, "revoke", key_id)
    assert _call(server, "POST", "/v1/cases/search", new_token).status_code == 401

    listing = medserve("keys", "--keys-file", keys_file, "list", "--all").stdout
    row = next(line for line in listing.splitlines() if line.startswith(key_id))
    assert "revoked" in row and "short-lived" in row
    assert key_id not in medserve("keys", "--keys-file", keys_file, "list").stdout


def test_secrets_never_reach_the_key_file_the_listing_or_the_log(
    server: ServerProcess, keys: dict[str, tuple[str, str]]
) -> None:
    keys_file = Path(keys["file"][0])
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    stored = keys_file.read_text()
    listing = medserve("keys", "--keys-file", str(keys_file), "list", "--all").stdout
    assert _call(server, "GET", "/v1/cases/scope-case-1", keys["reader"][1]).status_code == 200
    log = server.log()
    for key_id, token in (v for k, v in keys.items() if k != "file"):
        secret = token.split("_", 2)[2]
        assert secret not in stored and secret not in listing and secret not in log
        assert key_id in stored and key_id in listing
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    actors = {e.get("actor") for e in entries if e.get("event") == "request"}
    assert f"key:{keys['reader'][0]}" in actors


def test_cli_rejects_bad_input_with_clear_messages(tmp_path: Path) -> None:
    keys_file = str(tmp_path / "keys.json")
    for extra, message in (
        (["--scopes", "chat,cases:all"], "unknown scope"),
        (["--scopes", "chat", "--network", "10.0.0.300/8"], "10.0.0.300/8"),
        (["--scopes", "chat", "--expires", "2001-01-01"], "in the past"),
        (["--scopes", "chat", "--rpm", "-1"], "--rpm"),
    ):
        result = medserve(
            "keys", "--keys-file", keys_file, "create", "--name", "x", *extra, check=False
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not Path(keys_file).exists()
    result = medserve("keys", "--keys-file", keys_file, "revoke", "deadbeef", check=False)
    assert result.returncode == 2 and "no key with id" in result.stderr


def test_open_install_warns_and_closes_when_a_key_is_created(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = tmp_path_factory.mktemp("open_home")
    env = {
        "MEDSERVE_ENGINE_ENABLED": "false",
        "MEDSERVE_CASES_ENABLED": "false",
        "MEDSERVE_AUTH_KEYS_FILE": str(home / "keys.json"),
        "MEDSERVE_AUDIT_DIR": str(home / "audit"),
    }
    with ServerProcess.start(tmp_path_factory.mktemp("open_log"), env=env) as server:
        assert httpx.get(server.base_url + "/metrics").status_code == 200
        assert '"event": "auth.disabled"' in server.log()
        _, token = create_key(home / "keys.json", "prometheus", "metrics")
        assert httpx.get(server.base_url + "/metrics").status_code == 401
        assert httpx.get(server.base_url + "/metrics", headers=bearer(token)).status_code == 200
