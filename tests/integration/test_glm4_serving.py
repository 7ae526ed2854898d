"""A tiny random-weight GLM-4 exported to IR and served through the same server path.

The weights are random, so the text is noise; what is checked is the path: the server applies
the model's own GLM-4 chat template ([gMASK]<sop><|user|>...), streams, stops and counts tokens
exactly as it does for the bundled model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openvino_genai as ov_genai
import pytest
from medserve.models.tiny_glm4 import glm4_prompt

from tests.server_process import ServerProcess

MODEL = "tiny-glm4"
MESSAGES = [
    {"role": "system", "content": "You are a clinical assistant."},
    {"role": "user", "content": "Summarise the discharge letter."},
]


@pytest.fixture(scope="module")
def glm4_dir(tiny_glm4_dir: Path) -> Path:
    return tiny_glm4_dir


@pytest.fixture(scope="module")
def glm4_server(
    glm4_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(glm4_dir.parent),
        "MEDSERVE_ENGINE_MODEL": MODEL,
        "MEDSERVE_CASES_ENABLED": "false",
    }
    with ServerProcess.start(tmp_path_factory.mktemp("glm4_server"), env=env) as server:
        yield server


def _chat(server: ServerProcess, **extra: object) -> dict:
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 12, **extra}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_model_is_listed_as_glm4(glm4_server: ServerProcess) -> None:
    models = httpx.get(glm4_server.base_url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL]


def test_server_applies_the_glm4_chat_template(glm4_server: ServerProcess, glm4_dir: Path) -> None:
    tokenizer = ov_genai.Tokenizer(str(glm4_dir))
    expected_prompt = glm4_prompt(MESSAGES)
    assert expected_prompt.startswith("[gMASK]<sop><|system|>")
    expected_tokens = tokenizer.encode(expected_prompt, add_special_tokens=False).input_ids
    body = _chat(glm4_server)
    assert body["usage"]["prompt_tokens"] == expected_tokens.get_shape()[-1]
    assert 1 <= body["usage"]["completion_tokens"] <= 12
    assert body["choices"][0]["finish_reason"] in {"stop", "length"}


def test_glm4_greedy_stream_matches_non_stream(glm4_server: ServerProcess) -> None:
    first = _chat(glm4_server)
    second = _chat(glm4_server)
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": 12,
        "stream": True,
    }
    text = ""
    with httpx.stream(
        "POST", glm4_server.base_url + "/v1/chat/completions", json=body, timeout=120
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                text += delta.get("content", "")
    assert text == first["choices"][0]["message"]["content"]
