"""Legacy ``server.api_keys`` (deprecated, every scope: 401 in the OpenAI shape, logged by key
id, a warning at start) and serving two models at once.  Scoped keys: test_auth_scopes.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from medserve.server.auth.authenticator import legacy_key_id

from tests.conftest import BUNDLED_MODEL
from tests.server_process import ServerProcess

KEY = "test-key-0123456789abcdef"
FP16_MODEL = f"{BUNDLED_MODEL}-fp16"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def keyed_server(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    if not (models_dir / FP16_MODEL / "medserve.json").is_file():
        pytest.fail(f"{FP16_MODEL} not prepared; run `bash installer/setup.sh`", pytrace=False)
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_SERVED_MODELS": FP16_MODEL,
        "MEDSERVE_SERVER_API_KEYS": f"{KEY},another-key-abcdefghijklmnop",
        "MEDSERVE_CASES_ENABLED": "false",
        "MEDSERVE_SERVER_DOCS": "true",
        # no scoped keys: only the legacy list decides
        "MEDSERVE_AUTH_KEYS_FILE": str(tmp_path_factory.mktemp("keyed_home") / "keys.json"),
        "MEDSERVE_AUDIT_DIR": str(tmp_path_factory.mktemp("keyed_audit")),
    }
    with ServerProcess.start(tmp_path_factory.mktemp("keyed"), env=env) as server:
        yield server


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong-key-0123456789"}, {"authorization": f"Basic {KEY}"}],
)
def test_missing_or_wrong_key_is_401_in_openai_shape(
    keyed_server: ServerProcess, headers: dict[str, str]
) -> None:
    response = httpx.post(
        keyed_server.base_url + "/v1/chat/completions",
        json={"messages": QUESTION},
        headers=headers,
    )
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert httpx.get(keyed_server.base_url + "/v1/models", headers=headers).status_code == 401


def test_probes_stay_open_for_monitoring(keyed_server: ServerProcess) -> None:
    assert httpx.get(keyed_server.base_url + "/health").status_code == 200
    assert httpx.get(keyed_server.base_url + "/ready").status_code == 200


def test_both_models_answer_with_a_valid_key(keyed_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key=KEY, max_retries=0)
    assert sorted(m.id for m in client.models.list()) == sorted([BUNDLED_MODEL, FP16_MODEL])
    for model in (BUNDLED_MODEL, FP16_MODEL):
        reply = client.chat.completions.create(
            model=model, messages=QUESTION, temperature=0, max_tokens=24
        )
        assert reply.model == model
        assert "Paris" in (reply.choices[0].message.content or "")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=keyed_server.base_url + "/v1", api_key="nope-nope-nope-nope", max_retries=0
        ).models.list()


def test_access_log_names_the_key_id_never_the_key(keyed_server: ServerProcess) -> None:
    response = httpx.get(
        keyed_server.base_url + "/v1/models", headers={"authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 200
    assert httpx.get(keyed_server.base_url + "/v1/models").status_code == 401
    log = keyed_server.log()
    assert KEY not in log
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    actors = {e.get("actor") for e in entries if e.get("route") == "/v1/models"}
    assert f"key:{legacy_key_id(KEY)}" in actors
    # refused requests are logged too, with their route and no actor
    assert any(
        e.get("actor") == "-" and e.get("status") == 401 and e.get("route") == "/v1/models"
        for e in entries
    )
    # the deprecation warning, once, at start
    assert sum(e.get("event") == "auth.legacy_api_keys" for e in entries) == 1


def test_docs_are_openapi_json_only_with_no_cdn_ui(keyed_server: ServerProcess) -> None:
    assert httpx.get(keyed_server.base_url + "/schema/openapi.json").status_code == 401
    auth = {"authorization": f"Bearer {KEY}"}
    schema = httpx.get(keyed_server.base_url + "/schema/openapi.json", headers=auth)
    assert schema.status_code == 200
    assert "/v1/chat/completions" in schema.json()["paths"]
    for ui in ("/schema/swagger", "/schema/redoc", "/schema/elements", "/schema/rapidoc"):
        assert httpx.get(keyed_server.base_url + ui).status_code == 401  # the schema needs a key
        assert httpx.get(keyed_server.base_url + ui, headers=auth).status_code == 404


def test_docs_are_off_by_default(llm_server: ServerProcess) -> None:
    assert httpx.get(llm_server.base_url + "/schema/openapi.json").status_code == 404
