"""The OpenAI-compatible API end to end: real server process, real HTTP, real bundled model."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import BUNDLED_MODEL
from tests.server_process import ServerProcess

PARIS_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(server: ServerProcess, **body: Any) -> httpx.Response:
    body.setdefault("messages", PARIS_QUESTION)
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)


def _stream_events(server: ServerProcess, path: str, body: dict[str, Any]) -> list[Any]:
    events: list[Any] = []
    with httpx.stream("POST", server.base_url + path, json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
    return events


def _wait_engine_idle(server: ServerProcess, timeout_s: float = 30) -> dict[str, Any]:
    """Poll /metrics.json until no request is in flight or inside the engine; return the stats."""
    deadline = time.monotonic() + timeout_s
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = httpx.get(server.base_url + "/metrics.json").json()["models"][BUNDLED_MODEL]
        if stats["in_flight"] == 0 and stats["engine_requests"] == 0:
            break
        time.sleep(0.2)
    return stats


def _assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def test_health_ready_and_models(llm_server: ServerProcess) -> None:
    assert httpx.get(llm_server.base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(llm_server.base_url + "/ready").json()
    assert ready["status"] == "ready" and BUNDLED_MODEL in ready["models"]
    models = httpx.get(llm_server.base_url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [BUNDLED_MODEL]
    one = httpx.get(llm_server.base_url + f"/v1/models/{BUNDLED_MODEL}")
    assert one.status_code == 200 and one.json()["id"] == BUNDLED_MODEL
    _assert_openai_error(httpx.get(llm_server.base_url + "/v1/models/nope"), 404)


def test_chat_answers_the_capital_of_france(llm_server: ServerProcess) -> None:
    response = _chat(llm_server, model=BUNDLED_MODEL, temperature=0, max_tokens=32)
    assert response.status_code == 200  # not Litestar's default 201 for POST
    body = response.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5
    assert 0 < usage["completion_tokens"] <= 32
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_greedy_is_deterministic_and_stream_equals_non_stream(llm_server: ServerProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "Name three primary colours."}],
        "temperature": 0,
        "max_tokens": 40,
    }
    first = _chat(llm_server, **body).json()["choices"][0]["message"]["content"]
    second = _chat(llm_server, **body).json()["choices"][0]["message"]["content"]
    assert first == second and first.strip()

    events = _stream_events(llm_server, "/v1/chat/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == first
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) > 3
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}


def test_max_tokens_is_honoured(llm_server: ServerProcess) -> None:
    body = _chat(
        llm_server,
        messages=[{"role": "user", "content": "Write a long story about a hospital."}],
        temperature=0,
        max_tokens=5,
    ).json()
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length"


def test_stop_string_is_honoured(llm_server: ServerProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        "temperature": 0,
        "max_tokens": 60,
    }
    full = _chat(llm_server, **body).json()["choices"][0]["message"]["content"]
    assert "4" in full, full
    stop = "4"
    stopped = _chat(llm_server, **body, stop=[stop]).json()
    text = stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stop not in text
    assert full.startswith(text)
    assert len(text) < len(full)


def test_sampling_with_seed_is_reproducible(llm_server: ServerProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me a fact about the heart."}],
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": 40,
        "max_tokens": 24,
        "seed": 1234,
    }
    first = _chat(llm_server, **body).json()["choices"][0]["message"]["content"]
    second = _chat(llm_server, **body).json()["choices"][0]["message"]["content"]
    assert first == second


def test_completions_endpoint_stream_and_non_stream(llm_server: ServerProcess) -> None:
    body = {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 8}
    response = httpx.post(llm_server.base_url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200
    result = response.json()
    assert result["object"] == "text_completion"
    text = result["choices"][0]["text"]
    assert text.strip()
    events = _stream_events(
        llm_server,
        "/v1/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert streamed == text
    assert events[-2]["usage"]["completion_tokens"] == result["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    ("content", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
            400,
            "temperature",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}', 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(
    llm_server: ServerProcess, content: bytes, status: int, param: str | None
) -> None:
    response = httpx.post(
        llm_server.base_url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
    )
    error = _assert_openai_error(response, status)
    if param:
        assert error["param"] == param


def test_oversize_body_is_413(llm_server: ServerProcess) -> None:
    huge = {"messages": [{"role": "user", "content": "x" * 200_000}]}
    _assert_openai_error(
        httpx.post(llm_server.base_url + "/v1/chat/completions", json=huge, timeout=30), 413
    )
    # and the server is still fine
    assert _chat(llm_server, temperature=0, max_tokens=4).status_code == 200


def test_prompt_longer_than_context_is_400(llm_server: ServerProcess) -> None:
    # ~60k characters fits the 64 KiB body limit but not the context window
    long = {"messages": [{"role": "user", "content": "word " * 12_000}], "max_tokens": 4}
    error = _assert_openai_error(_chat(llm_server, **long), 400)
    assert error["code"] == "context_length_exceeded"


def test_official_openai_client(llm_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=llm_server.base_url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=BUNDLED_MODEL, messages=PARIS_QUESTION, temperature=0, max_tokens=32
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=BUNDLED_MODEL, messages=PARIS_QUESTION, temperature=0, max_tokens=32, stream=True
        )
        if chunk.choices
    ]
    assert "".join(pieces) == reply.choices[0].message.content
    assert [m.id for m in client.models.list()] == [BUNDLED_MODEL]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=PARIS_QUESTION)


def test_access_log_has_metadata_but_no_text(llm_server: ServerProcess) -> None:
    marker = f"patient-{uuid.uuid4().hex}"
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    response = httpx.post(
        llm_server.base_url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": f"Summarise: {marker} has a fever."}],
            "temperature": 0,
            "max_tokens": 8,
        },
        headers={"x-request-id": request_id},
        timeout=120,
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    completion = response.json()["choices"][0]["message"]["content"]
    time.sleep(0.3)
    log = llm_server.log()
    assert marker not in log
    if len(completion.strip()) > 12:
        assert completion.strip() not in log
    lines = [
        json.loads(line) for line in log.splitlines() if line.startswith("{") and request_id in line
    ]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["route"] == "/v1/chat/completions" and entry["status"] == 200
    assert entry["completion_tokens"] > 0 and entry["prompt_tokens"] > 0
    assert entry["latency_ms"] > 0


def test_client_giving_up_on_a_non_streamed_request_aborts_it(llm_server: ServerProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "Write a very long essay about medicine."}],
        "temperature": 0,
        "max_tokens": 3000,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(llm_server.base_url + "/v1/chat/completions", json=body, timeout=1.5)
    stats = _wait_engine_idle(llm_server, timeout_s=15)
    # 3000 tokens take far longer than this: it was aborted, not finished
    assert stats["in_flight"] == 0 and stats["engine_requests"] == 0
    entries = [json.loads(line) for line in llm_server.log().splitlines() if line.startswith("{")]
    assert any(e.get("status") == 499 and e.get("error") == "disconnected" for e in entries)


def test_access_log_records_route_templates_not_path_parameters(llm_server: ServerProcess) -> None:
    secret = f"mrn-{uuid.uuid4().hex}"  # e.g. a medical record number used as an id
    assert httpx.get(llm_server.base_url + f"/v1/models/{secret}").status_code == 404
    assert httpx.get(llm_server.base_url + f"/no/such/{secret}").status_code == 404
    time.sleep(0.3)
    log = llm_server.log()
    assert secret not in log
    routes = {json.loads(line).get("route") for line in log.splitlines() if line.startswith("{")}
    assert "/v1/models/{model_id}" in routes
