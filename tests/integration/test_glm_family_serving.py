"""Every GLM-family layout, exported by `medserve export`, served by one real server over HTTP.

One server, five tiny models (ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat in the original
``chatglm`` layout, GLM-4-9B-chat-hf as ``glm``, GLM-4-9B-0414 as ``glm4``), one worker each:
chat (the family's own prompt format), streaming, completions, stop strings and cancellation
take the same path as for the bundled model. The weights are random, so the text is noise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from tests.integration.conftest import FP16_EXPORTS
from tests.server_process import ServerProcess

MODELS = [f"{name}-fp16" for name in FP16_EXPORTS]
MESSAGES = [
    {"role": "system", "content": "You are a clinical assistant."},
    {"role": "user", "content": "Summarise the discharge letter. 请总结出院小结。"},
]


@pytest.fixture(scope="module")
def glm_server(
    glm_fp16_exports: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    models_dir = next(iter(glm_fp16_exports.values())).parent
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MODEL": MODELS[0],
        "MEDSERVE_ENGINE_SERVED_MODELS": ",".join(MODELS[1:]),
        "MEDSERVE_ENGINE_KV_CACHE_GB": "1",
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "2",
        # off so that freed KV blocks read as zero usage after a cancel
        "MEDSERVE_ENGINE_ENABLE_PREFIX_CACHING": "false",
        "MEDSERVE_CASES_ENABLED": "false",
    }
    with ServerProcess.start(tmp_path_factory.mktemp("glm_server"), env=env) as server:
        yield server


def _post(server: ServerProcess, route: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(server.base_url + route, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _chat(server: ServerProcess, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": 16}
    body.update(extra)
    return _post(server, "/v1/chat/completions", **body)


def _prompt_tokens(glm_fp16_exports: dict[str, Path], model: str) -> int:
    """Prompt length as the exported folder's own HF tokenizer and template count it."""
    tokenizer = AutoTokenizer.from_pretrained(str(glm_fp16_exports[model]))
    messages = MESSAGES[1:] if model.startswith("tiny-chatglm2") else MESSAGES
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_every_layout_is_listed(glm_server: ServerProcess) -> None:
    models = httpx.get(glm_server.base_url + "/v1/models").json()["data"]
    assert sorted(m["id"] for m in models) == sorted(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_chat_uses_the_family_prompt_format(
    model: str, glm_server: ServerProcess, glm_fp16_exports: dict[str, Path]
) -> None:
    if model.startswith("tiny-chatglm2"):  # ChatGLM2 has no system role: one user turn
        body = _chat(glm_server, model, messages=MESSAGES[1:])
    else:
        body = _chat(glm_server, model)
    assert body["model"] == model
    assert body["usage"]["prompt_tokens"] == _prompt_tokens(glm_fp16_exports, model)
    assert 1 <= body["usage"]["completion_tokens"] <= 16
    assert body["choices"][0]["finish_reason"] in {"stop", "length"}


@pytest.mark.parametrize("model", MODELS)
def test_stream_equals_the_non_streamed_answer(model: str, glm_server: ServerProcess) -> None:
    messages = MESSAGES[1:]
    whole = _chat(glm_server, model, messages=messages)["choices"][0]["message"]["content"]
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 16}
    text, finish = "", None
    with httpx.stream(
        "POST", glm_server.base_url + "/v1/chat/completions", json={**body, "stream": True},
        timeout=120,
    ) as response:  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
    assert text == whole
    assert finish in {"stop", "length"}


@pytest.mark.parametrize("model", MODELS)
def test_completions_and_stop_strings(model: str, glm_server: ServerProcess) -> None:
    body = {"model": model, "prompt": "Patient reports", "temperature": 0, "max_tokens": 24}
    full = _post(glm_server, "/v1/completions", **body)["choices"][0]["text"]
    assert full
    # Stop at a character from the middle of the greedy answer: it must end right before it.
    stop = next((c for c in full[len(full) // 2 :] if c.strip()), None)
    if stop is None:
        pytest.skip("greedy answer has no visible character to stop at")
    stopped = _post(glm_server, "/v1/completions", **body, stop=[stop])["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stop not in stopped["text"]
    assert full.startswith(stopped["text"])


def _wait_idle(server: ServerProcess, model: str, timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = httpx.get(server.base_url + "/metrics.json").json()["models"][model]
        if stats["in_flight"] == 0 and stats["engine_requests"] == 0:
            break
        time.sleep(0.2)
    return stats


def _long_running_body(server: ServerProcess, model: str) -> tuple[dict[str, Any], float]:
    """A greedy request that does not end on a stop token (random weights sometimes pick one
    early, and a request that finished on its own proves nothing about cancelling), with the
    seconds it takes when left to run: a client giving up must do so well before that."""
    for question in ("Describe the ward round.", "列出所有检查。", "Explain the dosage."):
        body = {"model": model, "messages": [{"role": "user", "content": question}]}
        body.update(temperature=0, max_tokens=1900)
        started = time.monotonic()
        answer = _chat(server, **body)
        elapsed = time.monotonic() - started
        if answer["choices"][0]["finish_reason"] == "length":
            return body, elapsed
        tokens = answer["usage"]["completion_tokens"]
        if tokens > 256:  # greedy is deterministic: one token short of its stop, it runs on
            return {**body, "max_tokens": tokens - 1}, elapsed
    pytest.fail(f"{model}: every candidate prompt stops by itself within 256 tokens")


@pytest.mark.parametrize("model", MODELS)
def test_cancelled_requests_free_the_engine(model: str, glm_server: ServerProcess) -> None:
    body, full_run_s = _long_running_body(glm_server, model)
    # A stream the client leaves after two chunks.
    with httpx.stream(
        "POST", glm_server.base_url + "/v1/chat/completions", json={**body, "stream": True},
        timeout=120,
    ) as response:  # fmt: skip
        assert response.status_code == 200
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data: {")
            if chunks >= 2:
                break
    stats = _wait_idle(glm_server, model)
    assert stats["in_flight"] == 0 and stats["engine_requests"] == 0
    # A non-streamed request the client gives up on: aborted, and logged as 499.
    disconnects_before = _disconnects(glm_server)
    with pytest.raises(httpx.ReadTimeout):
        # A fast CPU runs the tiny model's 1,900 tokens in well under a second.
        give_up_s = min(0.3, full_run_s / 4)
        httpx.post(glm_server.base_url + "/v1/chat/completions", json=body, timeout=give_up_s)
    stats = _wait_idle(glm_server, model)
    assert stats["in_flight"] == 0 and stats["engine_requests"] == 0
    time.sleep(0.3)  # the access-log line is written after the abort
    assert _disconnects(glm_server) == disconnects_before + 1, "no 499 for the abandoned request"


def _disconnects(server: ServerProcess) -> int:
    entries = [json.loads(x) for x in server.log().splitlines() if x.startswith("{")]
    return sum(e.get("status") == 499 for e in entries)
