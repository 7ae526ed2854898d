"""The clinical helper routes end to end: a real `medserve serve` (bundled model, constrained
decoding, real case index) over HTTP on 127.0.0.1, with scoped keys.

Every 200 answer is validated with jsonschema against the schema the server itself publishes in
/schema/openapi.json (and the model's part against the schema decoding was held to); similar
cases cite only ids that were retrieved; bad input is a 400 in the OpenAI error shape; a key
needs chat (and cases:read for similar cases); no complaint, note or case text reaches the log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from medserve.server.clinical.schemas import (
    DISCHARGE_SCHEMA,
    MAX_COMPLAINT_CHARS,
    MAX_NOTE_CHARS,
    SYMPTOMS_SCHEMA,
)

from tests.conftest import BUNDLED_MODEL
from tests.integration.cases_vignettes import SECRET_FRAGMENTS, vignette_cases
from tests.server_process import ServerProcess

COMPLAINTS = [
    ("en", "Severe headache for two days, no fever, some nausea."),
    ("en", "Chest pain radiating to the left arm since this morning, short of breath."),
    ("en", "Cough with yellow sputum for a week. Denies chest pain."),
    ("zh", "发热三天，伴咳嗽咳痰，无胸痛。"),
    ("zh", "右下腹疼痛12小时，伴恶心呕吐，否认腹泻。"),
    ("zh", "头晕两周，活动后加重，无耳鸣。"),
]

NOTE_EN = (
    "Discharge note. 67-year-old male admitted with community-acquired pneumonia of the right "
    "lower lobe. Treated with IV ceftriaxone, switched to oral amoxicillin-clavulanate 875 mg "
    "twice daily for 5 more days. Also on metformin 500 mg twice daily for type 2 diabetes. "
    "Follow-up: GP in one week, chest X-ray in 6 weeks. Return if fever above 38.5C, worsening "
    "shortness of breath or confusion."
)
NOTE_ZH = (
    "出院记录：患者女，54岁，因急性胆囊炎入院，行腹腔镜胆囊切除术，术后恢复良好。出院带药："
    "布洛芬400毫克，疼痛时口服，每日不超过3次。出院后1周普外科门诊复查伤口。如出现发热、"
    "腹痛加重、皮肤或眼睛发黄，请立即返院。"
)
SIMILAR_QUERIES = [
    "Elderly man with chest pain and ST elevation on ECG, troponin raised.",
    "儿童发热咳嗽三天，胸片示肺部实变。",
    "Fall at home, hip pain, cannot walk.",
]
# Distinctive words of the inputs above: none may appear in the server log.
PRIVATE = ("yellow sputum", "右下腹疼痛", "ceftriaxone", "胆囊切除", "ST elevation on ECG")


def _medserve(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MEDSERVE_")},
    )
    return result.stdout


def _create_key(keys_file: Path, name: str, scopes: str) -> str:
    out = _medserve(
        "keys", "--keys-file", str(keys_file), "create", "--name", name, "--scopes", scopes
    )
    return next(line for line in out.splitlines() if line.startswith("msk_"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    keys_file = tmp_path_factory.mktemp("clinical_keys") / "keys.json"
    made = {
        "clinician": _create_key(keys_file, "emr", "chat,cases:read,cases:write"),
        "chat": _create_key(keys_file, "chat-only", "chat"),
        "reader": _create_key(keys_file, "case-reader", "cases:read"),
    }
    return {"file": str(keys_file), **made}


@pytest.fixture(scope="module")
def server(
    models_dir: Path, keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("clinical_home")
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "2",
        "MEDSERVE_ENGINE_KV_CACHE_GB": "1",
        "MEDSERVE_SERVER_DOCS": "true",
        "MEDSERVE_SERVER_MAX_BODY_BYTES": "131072",
        "MEDSERVE_CASES_ENABLED": "true",
        "MEDSERVE_CASES_DATA_DIR": str(home / "cases"),
        "MEDSERVE_AUTH_KEYS_FILE": keys["file"],
        "MEDSERVE_AUDIT_DIR": str(home / "audit"),
    }
    with ServerProcess.start(tmp_path_factory.mktemp("clinical_log"), env=env) as srv:
        seeded = _post(srv, "/v1/cases", {"cases": vignette_cases()}, keys["clinician"])
        assert seeded.status_code == 200, seeded.text
        yield srv


@pytest.fixture(scope="module")
def published(server: ServerProcess, keys: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(server.base_url + "/schema/openapi.json", headers=_auth(keys["chat"]))
    assert response.status_code == 200, response.text
    return response.json()


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _post(server: ServerProcess, path: str, body: Any, token: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server.base_url + path,
        content=content,
        headers={**_auth(token), "content-type": "application/json"},
        timeout=300,
    )


def _assert_published(document: dict[str, Any], path: str, body: Any) -> None:
    """``body`` validates against the 200 schema the server documents for POST ``path``."""
    ok = document["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]
    schema = {"$ref": ok["schema"]["$ref"], "components": document["components"]}
    errors = list(Draft202012Validator(schema).iter_errors(body))
    assert not errors, [f"{e.json_path}: {e.message}" for e in errors]


def _assert_valid(schema: dict[str, Any], value: Any) -> None:
    errors = list(Draft202012Validator(schema).iter_errors(value))
    assert not errors, [f"{e.json_path}: {e.message}" for e in errors]


# -- the three routes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "text"), COMPLAINTS, ids=[f"{c[0]}{i}" for i, c in enumerate(COMPLAINTS)]
)
def test_symptoms_are_schema_valid_json(
    server: ServerProcess, keys: dict[str, str], published: dict[str, Any], language: str, text: str
) -> None:
    response = _post(server, "/v1/clinical/symptoms", {"text": text}, keys["chat"])
    assert response.status_code == 200, response.text
    body = response.json()
    _assert_published(published, "/v1/clinical/symptoms", body)
    _assert_valid(SYMPTOMS_SCHEMA, {"symptoms": body["symptoms"]})
    assert body["model"] == BUNDLED_MODEL
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["symptoms"], f"no symptom found in a {language} complaint"


@pytest.mark.parametrize(
    ("note", "language", "expected"),
    [(NOTE_EN, None, "en"), (NOTE_ZH, None, "zh"), (NOTE_ZH, "en", "en")],
    ids=["en-auto", "zh-auto", "zh-to-en"],
)
def test_discharge_summary_is_schema_valid_json(
    server: ServerProcess,
    keys: dict[str, str],
    published: dict[str, Any],
    note: str,
    language: str | None,
    expected: str,
) -> None:
    response = _post(
        server, "/v1/clinical/discharge-summary", {"note": note, "language": language}, keys["chat"]
    )
    assert response.status_code == 200, response.text
    body = response.json()
    _assert_published(published, "/v1/clinical/discharge-summary", body)
    model_part = {k: body[k] for k in DISCHARGE_SCHEMA["properties"]}
    _assert_valid(DISCHARGE_SCHEMA, model_part)
    assert body["language"] == expected
    assert body["summary"].strip()


@pytest.mark.parametrize("text", SIMILAR_QUERIES)
def test_similar_cases_cite_only_retrieved_cases(
    server: ServerProcess, keys: dict[str, str], published: dict[str, Any], text: str
) -> None:
    response = _post(
        server, "/v1/clinical/similar-cases", {"text": text, "k": 3}, keys["clinician"]
    )
    assert response.status_code == 200, response.text
    body = response.json()
    _assert_published(published, "/v1/clinical/similar-cases", body)
    retrieved = [c["case_id"] for c in body["cases"]]
    assert len(retrieved) == 3
    assert set(retrieved) <= {c["id"] for c in vignette_cases()}
    scores = [c["score"] for c in body["cases"]]
    assert scores == sorted(scores, reverse=True)
    assert body["summary"] and body["reason"] is None
    assert set(body["cited_case_ids"]) <= set(retrieved)
    assert len(body["cited_case_ids"]) == len(set(body["cited_case_ids"]))
    assert body["model"] == BUNDLED_MODEL


def test_similar_cases_with_no_match_runs_no_model(
    server: ServerProcess, keys: dict[str, str], published: dict[str, Any]
) -> None:
    body = {"text": "chest pain", "k": 5, "filters": {"department": "No Such Ward"}}
    response = _post(server, "/v1/clinical/similar-cases", body, keys["clinician"])
    assert response.status_code == 200, response.text
    answer = response.json()
    _assert_published(published, "/v1/clinical/similar-cases", answer)
    assert answer["summary"] is None and answer["reason"]
    assert answer["cases"] == [] and answer["cited_case_ids"] == []
    assert answer["model"] is None and answer["usage"] is None


def test_similar_cases_filters_narrow_the_retrieved_set(
    server: ServerProcess, keys: dict[str, str]
) -> None:
    body = {"text": "chest pain", "k": 10, "filters": {"icd10": "I21"}}
    response = _post(server, "/v1/clinical/similar-cases", body, keys["clinician"])
    assert response.status_code == 200, response.text
    cases = response.json()["cases"]
    assert cases and all(any(code.startswith("I21") for code in c["icd10"]) for c in cases)
    assert set(response.json()["cited_case_ids"]) <= {c["case_id"] for c in cases}


# -- refusals ----------------------------------------------------------------------------

_BAD = [
    ("/v1/clinical/symptoms", {"text": ""}, "text"),
    ("/v1/clinical/symptoms", {"text": " \n\t "}, "text"),
    ("/v1/clinical/symptoms", {"text": "x" * (MAX_COMPLAINT_CHARS + 1)}, "text"),
    ("/v1/clinical/symptoms", {"text": 42}, "text"),
    ("/v1/clinical/symptoms", {}, None),
    ("/v1/clinical/symptoms", {"text": "fever", "temperature": 1}, "temperature"),
    ("/v1/clinical/discharge-summary", {"note": "   "}, "note"),
    ("/v1/clinical/discharge-summary", {"note": "y" * (MAX_NOTE_CHARS + 1)}, "note"),
    ("/v1/clinical/discharge-summary", {"note": "ok", "language": "fr"}, "language"),
    ("/v1/clinical/similar-cases", {"text": "", "k": 3}, "text"),
    ("/v1/clinical/similar-cases", {"text": "fever", "k": 0}, "k"),
    ("/v1/clinical/similar-cases", {"text": "fever", "k": 11}, "k"),
    ("/v1/clinical/similar-cases", {"text": "fever", "filters": {"ward": "A"}}, "filters.ward"),
    (
        "/v1/clinical/similar-cases",
        {"text": "fever", "filters": {"age_min": 80, "age_max": 20}},
        "filters.age_min",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), _BAD)
def test_bad_input_is_400_in_openai_shape(
    server: ServerProcess, keys: dict[str, str], path: str, body: Any, param: str | None
) -> None:
    response = _post(server, path, body, keys["clinician"])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("path", ["/v1/clinical/symptoms", "/v1/clinical/similar-cases"])
def test_invalid_json_and_unknown_model(
    server: ServerProcess, keys: dict[str, str], path: str
) -> None:
    response = _post(server, path, b"{not json", keys["clinician"])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"
    response = _post(server, path, {"text": "fever", "model": "no-such-model"}, keys["clinician"])
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


def test_scopes_chat_and_cases_read(server: ServerProcess, keys: dict[str, str]) -> None:
    cases_body = {"text": "fever", "k": 1}
    chat_only = _post(server, "/v1/clinical/similar-cases", cases_body, keys["chat"])
    assert chat_only.status_code == 403, chat_only.text
    assert chat_only.json()["error"]["code"] == "insufficient_scope"
    reader = _post(server, "/v1/clinical/similar-cases", cases_body, keys["reader"])
    assert reader.status_code == 403, reader.text
    reader = _post(server, "/v1/clinical/symptoms", {"text": "fever"}, keys["reader"])
    assert reader.status_code == 403, reader.text
    anonymous = httpx.post(server.base_url + "/v1/clinical/symptoms", json={"text": "fever"})
    assert anonymous.status_code == 401, anonymous.text


# -- privacy (runs last in this module: the routes above have written their log lines) ----


def test_no_patient_text_in_the_log(server: ServerProcess) -> None:
    log = server.log()
    assert "/v1/clinical/symptoms" in log, "the access log is being written"
    for fragment in (*PRIVATE, *SECRET_FRAGMENTS):
        assert fragment not in log, f"patient text leaked into the server log: {fragment!r}"
