"""Every documented route fuzzed with schemathesis against the server's own /schema.

A real server (bundled model, case index on) on 127.0.0.1; the schemathesis CLI generates
valid and invalid bodies and path parameters from the OpenAPI document and checks that no
response is a 5xx, that every status, content type and JSON body is the documented one, and
that bodies the schema forbids are refused.  Fixed seed and example count keep the run
reproducible and to a few minutes; a context of 64 tokens keeps each generation short.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BUNDLED_MODEL
from tests.server_process import NETGUARD, ServerProcess

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)
REFUSALS = (400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429)
SEED = 12
MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_server(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("fuzz_home")
    env = {
        "MEDSERVE_HOME": str(home),
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "2",
        "MEDSERVE_ENGINE_KV_CACHE_GB": "1",
        "MEDSERVE_ENGINE_MAX_CONTEXT_TOKENS": "64",
        "MEDSERVE_ENGINE_DEFAULT_MAX_TOKENS": "8",
        "MEDSERVE_SERVER_DOCS": "true",
        "MEDSERVE_SERVER_MAX_BODY_BYTES": "65536",
        "MEDSERVE_CASES_ENABLED": "true",
        "MEDSERVE_CASES_DATA_DIR": str(home / "cases"),
    }
    with ServerProcess.start(tmp_path_factory.mktemp("fuzz_log"), env=env) as server:
        yield server


def test_schema_documents_every_body(fuzz_server: ServerProcess) -> None:
    document = httpx.get(fuzz_server.base_url + "/schema/openapi.json").json()
    components = document["components"]["schemas"]
    operations = [
        (path, method, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]
    expected = {
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/models", "get"),
        ("/v1/models/{model_id}", "get"),
        ("/v1/cases", "post"),
        ("/v1/cases/{case_id}", "get"),
        ("/v1/cases/{case_id}", "delete"),
        ("/v1/cases/search", "post"),
        ("/v1/embeddings", "post"),
        ("/metrics", "get"),
        ("/metrics.json", "get"),
        ("/admin/reload", "post"),
    }
    # Actions that take no body: everything else posted must document its body.
    bodyless = {("/admin/reload", "post")}
    assert expected <= {(path, method) for path, method, _ in operations}
    for path, method, op in operations:
        where = f"{method.upper()} {path}"
        if method == "post" and (path, method) not in bodyless:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in components, where
        ok = op["responses"]["200"]["content"]
        assert ok, where
        for media in ok.values():
            ref = media["schema"].get("$ref")
            assert ref is None or ref.rsplit("/", 1)[1] in components, where
        error = op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"]
        assert error.endswith("/ErrorResponse"), where
    streamed = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(streamed) == {"application/json", "text/event-stream"}
    # Unsupported OpenAI fields are documented (and refused unless at their default).
    chat = components["ChatCompletionRequest"]
    assert {"logprobs", "response_format", "tools", "n"} <= set(chat["properties"])
    assert chat["additionalProperties"] is False


def test_schemathesis_finds_no_server_error(fuzz_server: ServerProcess, tmp_path: Path) -> None:
    # A few known cases first, so that lookups by id hit something.
    seeded = httpx.post(
        fuzz_server.base_url + "/v1/cases",
        json={"cases": [{"id": "c1", "text": "chest pain, troponin raised", "age": 60}]},
        timeout=60,
    )
    assert seeded.status_code == 200, seeded.text
    report = tmp_path / "report"
    config = tmp_path / "schemathesis.toml"
    # 413 (body over server.max_body_bytes) is a refusal too; the rest are schemathesis' own.
    config.write_text(f"[checks.negative_data_rejection]\nexpected-statuses = {list(REFUSALS)}\n")
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(config),
        "run",
        fuzz_server.base_url + "/schema/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "1",
        "--phases",
        "examples,coverage,fuzzing",
        "--generation-database",
        "none",
        "--request-timeout",
        "60",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(report),
    ]
    env = {
        **os.environ,
        # The loopback-only guard, as in the server: the fuzzer calls nothing else either.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    # The server is still healthy and serving after the whole run.
    answer = httpx.post(
        fuzz_server.base_url + "/v1/chat/completions",
        json={"model": BUNDLED_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
