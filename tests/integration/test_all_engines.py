"""One server, one model per engine, all at once: OpenVINO, ipex-llm, llama.cpp, chatglm.cpp.

Each model runs in its own worker process in its engine's own virtual environment; the server
imports none of them. The folders are made with the user's own commands: `medserve setup`
(OpenVINO IR and the bundled GGUF), `medserve quantize --engine ipex-llm` and
`medserve export --engine chatglm-cpp` (a tiny random ChatGLM3, the only family chatglm.cpp
serves).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from medserve.installer.bundled_model import GGUF_MODEL_NAME

from tests.conftest import BUNDLED_MODEL, medserve_home
from tests.integration.engine_contract import Contract, contract_env, wait_until
from tests.integration.ipex_llm_models import (
    HF_DIR_NAME,
    quantized_bundled_model,
    require_engine,
    serving_dir,
)
from tests.server_process import ServerProcess

CHATGLM_MODEL = "tiny-chatglm3-q8_0"
ENGINES = ("ipex-llm", "llama-cpp", "chatglm-cpp")


@pytest.fixture(scope="module")
def every_engine(
    models_dir: Path, glm_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    for engine in ENGINES:
        require_engine(engine)
    hf_dir = medserve_home() / "hf" / HF_DIR_NAME
    ipex_root, ipex_name = quantized_bundled_model(tmp_path_factory, hf_dir, "sym_int4")
    exported = tmp_path_factory.mktemp("all_engines_export")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medserve.server.cli",
            "export",
            "--engine",
            "chatglm-cpp",
            "--hf-dir",
            str(glm_checkpoints["tiny-chatglm3"]),
            "--name",
            CHATGLM_MODEL,
            "--weight-format",
            "q8_0",
            "--models-dir",
            str(exported),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    models = {
        BUNDLED_MODEL: "openvino",
        ipex_name: "ipex-llm",
        GGUF_MODEL_NAME: "llama-cpp",
        CHATGLM_MODEL: "chatglm-cpp",
    }
    serve = serving_dir(
        tmp_path_factory.mktemp("all_engines") / "models",
        models_dir / BUNDLED_MODEL,
        ipex_root / ipex_name,
        models_dir / GGUF_MODEL_NAME,
        exported / CHATGLM_MODEL,
    )
    others = ",".join(name for name in models if name != BUNDLED_MODEL)
    env = contract_env(
        serve, BUNDLED_MODEL, MEDSERVE_ENGINE_SERVED_MODELS=others, MEDSERVE_ENGINE_MAX_QUEUE="4"
    )
    with ServerProcess.start(serve.parent, env=env) as server:
        yield server, models


def test_every_engine_serves_its_model_at_the_same_time(
    every_engine: tuple[ServerProcess, dict[str, str]],
) -> None:
    server, models = every_engine
    stats = httpx.get(server.base_url + "/metrics.json", timeout=30).json()["models"]
    assert set(models) <= set(stats)
    # One worker process per model, so one engine crashing cannot take another down.
    assert len({stats[name]["pid"] for name in models}) == len(models)
    listed = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]
    assert {m["id"] for m in listed} >= set(models)

    def ask(name: str) -> httpx.Response:
        return Contract(server, name).chat(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=12,
        )

    with ThreadPoolExecutor(len(models)) as pool:
        answers = dict(zip(models, pool.map(ask, models), strict=True))
    for name, response in answers.items():
        assert response.status_code == 200, (name, response.text)
        body = response.json()
        assert body["model"] == name
        assert body["usage"]["completion_tokens"] > 0, (name, body)
    assert "Paris" in answers[BUNDLED_MODEL].json()["choices"][0]["message"]["content"]

    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    for name, engine in models.items():
        assert f'medserve_model_info{{engine="{engine}",model="{name}"' in text, (name, text)


def test_killing_one_engine_leaves_the_others_serving(
    every_engine: tuple[ServerProcess, dict[str, str]],
) -> None:
    server, models = every_engine
    stats = httpx.get(server.base_url + "/metrics.json", timeout=30).json()["models"]
    os.kill(stats[GGUF_MODEL_NAME]["pid"], signal.SIGKILL)
    for name in models:
        if name == GGUF_MODEL_NAME:
            continue
        response = Contract(server, name).chat(temperature=0, max_tokens=4)
        assert response.status_code == 200, (name, response.text)

    def back() -> bool:
        now = httpx.get(server.base_url + "/metrics.json", timeout=30).json()["models"]
        pid = now.get(GGUF_MODEL_NAME, {}).get("pid")  # absent while the worker is down
        return pid not in (None, stats[GGUF_MODEL_NAME]["pid"])

    wait_until(back, 120, "the llama.cpp worker restarted")
    assert Contract(server, GGUF_MODEL_NAME).chat(temperature=0, max_tokens=4).status_code == 200
