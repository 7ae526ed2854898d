"""The knowledge base end to end: a real `medserve serve` with the bundled model over HTTP.

Ingest English and Chinese guideline texts (and a PDF), answer related questions with citations
whose offsets point into the stored text, refuse unrelated ones without calling the model,
survive a restart, delete, reject bad input in the OpenAI error shape, and keep every document,
question and answer text out of the server log.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_process import ServerProcess

DOCS = {
    "hypertension": (
        "Hypertension management in adults",
        "en",
        "Hypertension is diagnosed when clinic blood pressure is 140/90 mmHg or higher on "
        "repeated measurement, confirmed by ambulatory or home blood pressure monitoring.\n\n"
        "First-line drug treatment for adults under 55 without diabetes is an ACE inhibitor "
        "or an angiotensin receptor blocker. For adults aged 55 or over, or of African or "
        "Caribbean family origin, start a calcium channel blocker such as amlodipine.\n\n"
        "The treatment target is a clinic blood pressure below 140/90 mmHg for people under "
        "80 years, and below 150/90 mmHg for people aged 80 and over. Review lifestyle: "
        "reduce salt intake below 6 g per day, limit alcohol, and exercise regularly.",
    ),
    "metformin": (
        "Metformin in type 2 diabetes",
        "en",
        "Metformin is the first-line glucose-lowering drug for adults with type 2 diabetes. "
        "Start with 500 mg once daily with the evening meal and increase gradually to reduce "
        "gastrointestinal side effects, up to 2 g per day in divided doses.\n\n"
        "Check renal function before starting. Reduce the dose if the eGFR is between 30 and "
        "45 ml/min/1.73m2, and stop metformin if the eGFR falls below 30 because of the risk "
        "of lactic acidosis. Withhold metformin before iodinated contrast in patients with "
        "impaired renal function.",
    ),
    "gaoxueya": (
        "高血压诊疗要点",
        "zh",
        "成人高血压的诊断标准为：非同日三次测量诊室血压，收缩压≥140mmHg和/或舒张压≥90mmHg。"
        "建议结合家庭血压监测或动态血压监测确诊。\n\n"
        "一般高血压患者的降压目标为血压<140/90mmHg；能耐受者可进一步降至<130/80mmHg。"
        "常用一线降压药物包括钙通道阻滞剂、血管紧张素转换酶抑制剂、血管紧张素受体拮抗剂、"
        "利尿剂。生活方式干预包括减少钠盐摄入，每人每日食盐摄入量不超过5克；控制体重；戒烟限酒。",
    ),
    "tangniaobing": (
        "2型糖尿病的血糖控制",
        "zh",
        "二甲双胍是2型糖尿病患者控制高血糖的一线用药和药物联合中的基本用药。"
        "起始剂量为每次500毫克，每日一至两次，随餐服用，逐渐加量以减少胃肠道反应。\n\n"
        "糖化血红蛋白的控制目标一般为<7.0%。估算肾小球滤过率低于30毫升每分钟时禁用二甲双胍。"
        "患者应定期监测血糖，并接受糖尿病自我管理教育。",
    ),
}

RELATED = [
    ("What is the first-line drug for hypertension in a 60-year-old?", "hypertension"),
    ("When should metformin be stopped because of kidney function?", "metformin"),
    ("高血压患者的降压目标是多少？", "gaoxueya"),
    ("二甲双胍的起始剂量是多少？", "tangniaobing"),
]
UNRELATED = [
    "How do I bake sourdough bread?",
    "What is the capital of France?",
    "怎样做红烧肉？",
]
SECRETS = ("amlodipine", "lactic acidosis", "钙通道阻滞剂", "sourdough", "红烧肉")


def _env(home: Path, models_dir: Path) -> dict[str, str]:
    return {
        "MEDSERVE_HOME": str(home),
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "2",
        "MEDSERVE_ENGINE_KV_CACHE_GB": "1",
        "MEDSERVE_CASES_ENABLED": "false",
        "MEDSERVE_KNOWLEDGE_DATA_DIR": str(home / "knowledge"),
    }


def _post(server: ServerProcess, path: str, body: Any) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=300)


def _ingest(server: ServerProcess) -> dict[str, str]:
    ids: dict[str, str] = {}
    for key, (title, language, text) in DOCS.items():
        response = _post(
            server, "/v1/documents", {"title": title, "text": text, "language": language}
        )
        assert response.status_code == 200, response.text
        (doc,) = response.json()["data"]
        assert doc["chunks"] >= 1
        ids[key] = doc["id"]
    return ids


def _stored_text(server: ServerProcess, document_id: str) -> str:
    response = httpx.get(f"{server.base_url}/v1/documents/{document_id}", timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["text"])


def _assert_grounded(server: ServerProcess, body: dict[str, Any], expected_id: str) -> None:
    assert body["refused"] is False, body
    assert body["object"] == "answer" and isinstance(body["answer"], str)
    assert body["passages"] and body["citations"]
    assert body["passages"][0]["document_id"] == expected_id, "best passage from the right doc"
    texts = {d: _stored_text(server, d) for d in {p["document_id"] for p in body["passages"]}}
    for passage in body["passages"]:
        stored = texts[passage["document_id"]]
        assert stored[passage["start"] : passage["end"]] == passage["text"]
    by_index = {p["index"]: p for p in body["passages"]}
    for citation in body["citations"]:
        passage = by_index[citation["index"]]
        assert (citation["start"], citation["end"]) == (passage["start"], passage["end"])
        assert citation["document_id"] == passage["document_id"]
        assert isinstance(citation["cited_by_model"], bool)
    assert body["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kb_home")


@pytest.fixture(scope="module")
def server(
    home: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with ServerProcess.start(tmp_path_factory.mktemp("kb_log"), env=_env(home, models_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
def ids(server: ServerProcess) -> dict[str, str]:
    return _ingest(server)


def test_related_questions_are_answered_with_citations_into_stored_text(
    server: ServerProcess, ids: dict[str, str]
) -> None:
    for question, key in RELATED:
        response = _post(server, "/v1/answers", {"question": question, "max_tokens": 48})
        assert response.status_code == 200, response.text
        _assert_grounded(server, response.json(), ids[key])


def test_unrelated_questions_are_refused_without_the_model(
    server: ServerProcess, ids: dict[str, str]
) -> None:
    for question in UNRELATED:
        response = _post(server, "/v1/answers", {"question": question})
        assert response.status_code == 200, response.text
        assert response.json() == {
            "answer": None,
            "refused": True,
            "reason": "no passage in the knowledge base is relevant enough",
            # Two documents per language: too few for language-centred scores.
            "scoring": "cosine",
            "min_score": 0.85,
            "context_min_score": 0.85,
            "citations": [],
            "passages": [],
        }


def test_list_and_pdf_ingest(server: ServerProcess, ids: dict[str, str]) -> None:
    listed = httpx.get(server.base_url + "/v1/documents", timeout=30).json()["data"]
    assert set(ids.values()) <= {d["id"] for d in listed}
    assert all("text" not in d for d in listed)
    pdf = _pdf_bytes("Warfarin dosing: target INR 2.0 to 3.0 for atrial fibrillation.")
    response = _post(
        server,
        "/v1/documents",
        {
            "documents": [
                {
                    "title": "Warfarin",
                    "text": base64.b64encode(pdf).decode(),
                    "format": "pdf_base64",
                }
            ]
        },
    )
    assert response.status_code == 200, response.text
    doc_id = response.json()["data"][0]["id"]
    assert "INR 2.0 to 3.0" in _stored_text(server, doc_id)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"title": "x", "text": "   "}, "text"),
        ({"title": "x", "text": "not base64!!", "format": "pdf_base64"}, "text"),
        (
            {"title": "x", "text": base64.b64encode(b"hello").decode(), "format": "pdf_base64"},
            "text",
        ),
        ({"title": "x"}, "text"),
    ],
)
def test_bad_documents_are_400(server: ServerProcess, body: dict[str, Any], param: str) -> None:
    response = _post(server, "/v1/documents", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_bad_answer_requests_are_400(server: ServerProcess) -> None:
    for body in ({"question": ""}, {"question": "x", "top_k": 21}, {"nope": 1}):
        response = _post(server, "/v1/answers", body)
        assert response.status_code == 400, response.text
        assert "error" in response.json()


def test_restart_keeps_documents_then_delete_removes_them(
    server: ServerProcess,
    ids: dict[str, str],
    home: Path,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server.stop()
    log_dir = tmp_path_factory.mktemp("kb_log2")
    with ServerProcess.start(log_dir, env=_env(home, models_dir)) as again:
        assert "knowledge.index_loaded" in again.log(), "the saved snapshot was used"
        question, key = RELATED[2]
        response = _post(again, "/v1/answers", {"question": question, "max_tokens": 32})
        assert response.status_code == 200, response.text
        _assert_grounded(again, response.json(), ids[key])
        gone = httpx.delete(f"{again.base_url}/v1/documents/{ids[key]}", timeout=30)
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        missing = httpx.get(f"{again.base_url}/v1/documents/{ids[key]}", timeout=30)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "document_not_found"
        again_delete = httpx.delete(f"{again.base_url}/v1/documents/{ids[key]}", timeout=30)
        assert again_delete.status_code == 404
        response = _post(again, "/v1/answers", {"question": question, "max_tokens": 32})
        body = response.json()
        assert all(p["document_id"] != ids[key] for p in body["passages"])
    # Without the saved snapshot the index is rebuilt from SQLite: same documents, same answers.
    (home / "knowledge" / "index.json").unlink()
    with ServerProcess.start(log_dir, env=_env(home, models_dir)) as rebuilt:
        assert "knowledge.index_rebuild" in rebuilt.log()
        question, key = RELATED[1]
        response = _post(rebuilt, "/v1/answers", {"question": question, "max_tokens": 16})
        assert response.status_code == 200, response.text
        _assert_grounded(rebuilt, response.json(), ids[key])
        listed = httpx.get(rebuilt.base_url + "/v1/documents", timeout=30).json()["data"]
        assert ids["gaoxueya"] not in {d["id"] for d in listed}
        for log in (server.log(), again.log(), rebuilt.log()):
            assert "knowledge." in log
            for secret in SECRETS:
                assert secret not in log, f"text leaked into the log: {secret!r}"


def _pdf_bytes(line: str) -> bytes:
    """A one-page PDF with ``line`` in Helvetica, written by hand (no PDF writer needed)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({line}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)
