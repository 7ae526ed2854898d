"""The ipex-llm engine, served beside the OpenVINO model: the shared serving contract on a
sym_int4 folder, answers and round-robin concurrency on a sym_int8 folder.

Both folders are quantized from the bundled model's HF folder with ``medserve quantize`` once
per session; each server serves them next to the OpenVINO IR of the same model, each model
in its own worker process (the ipex-llm one in .venv-ipex-llm).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BUNDLED_MODEL, medserve_home
from tests.integration.engine_contract import (
    FOUR_QUESTIONS,
    Contract,
    EngineContract,
    alone_then_together,
    contract_env,
    stream_text,
)
from tests.integration.ipex_llm_models import HF_DIR_NAME, quantized_bundled_model, serving_dir
from tests.server_process import ServerProcess

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def bundled_hf_dir(models_dir: Path) -> Path:
    hf_dir = medserve_home() / "hf" / HF_DIR_NAME
    if not (hf_dir / "config.json").is_file():
        pytest.fail(f"{hf_dir} missing; run `bash installer/setup.sh`", pytrace=False)
    return hf_dir


class TestIpexLlmSymInt4(EngineContract):
    @pytest.fixture(scope="class")
    @classmethod
    def contract(
        cls, models_dir: Path, bundled_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Contract]:
        quantized, name = quantized_bundled_model(tmp_path_factory, bundled_hf_dir, "sym_int4")
        serve = serving_dir(
            tmp_path_factory.mktemp("ipex_contract") / "models",
            quantized / name,
            models_dir / BUNDLED_MODEL,
        )
        env = contract_env(serve, name, MEDSERVE_ENGINE_SERVED_MODELS=BUNDLED_MODEL)
        with ServerProcess.start(serve.parent, env=env) as server:
            yield Contract(server, name)

    def test_served_by_ipex_llm_beside_openvino(self, contract: Contract) -> None:
        stats = httpx.get(contract.url("/metrics.json")).json()["models"]
        assert stats[contract.model]["low_bit"] == "sym_int4"
        assert stats[contract.model]["pid"] != stats[BUNDLED_MODEL]["pid"]
        for model in (contract.model, BUNDLED_MODEL):
            answer = contract.chat(model=model, messages=PARIS, temperature=0, max_tokens=24)
            assert "Paris" in answer.json()["choices"][0]["message"]["content"], answer.text

    def test_seeded_sampling_is_reproducible_and_seed_matters(self, contract: Contract) -> None:
        body = {"temperature": 1.0, "top_p": 0.9, "top_k": 40, "max_tokens": 24}
        texts = [
            contract.chat(**body, seed=seed).json()["choices"][0]["message"]["content"]
            for seed in (1234, 1234, 99, 7)
        ]
        assert texts[0] == texts[1]
        assert len(set(texts)) > 1  # three seeds giving one text would mean no sampling


@pytest.fixture(scope="module")
def int8_server(
    models_dir: Path, bundled_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, str]]:
    """sym_int8 beside OpenVINO, four sequences at a time."""
    quantized, name = quantized_bundled_model(tmp_path_factory, bundled_hf_dir, "sym_int8")
    serve_root = tmp_path_factory.mktemp("ipex_int8") / "models"
    serve = serving_dir(serve_root, quantized / name, models_dir / BUNDLED_MODEL)
    env = contract_env(
        serve,
        name,
        MEDSERVE_ENGINE_SERVED_MODELS=BUNDLED_MODEL,
        MEDSERVE_ENGINE_MAX_NUM_SEQS="4",
        MEDSERVE_ENGINE_MAX_QUEUE="4",
    )
    with ServerProcess.start(serve.parent, env=env) as server:
        yield server, name


def test_sym_int8_answers_like_a_stream(int8_server: tuple[ServerProcess, str]) -> None:
    server, name = int8_server
    contract = Contract(server, name)
    answer = contract.chat(messages=PARIS, temperature=0, max_tokens=24).json()
    text = answer["choices"][0]["message"]["content"]
    assert "Paris" in text
    assert stream_text(contract, {"messages": PARIS, "temperature": 0, "max_tokens": 24})[0] == text


def test_four_streams_take_turns_and_match_their_answers_alone(
    int8_server: tuple[ServerProcess, str],
) -> None:
    """Round-robin: four requests run at once, each exactly as it would alone (batch 1)."""
    server, name = int8_server
    contract = Contract(server, name)
    body = {"temperature": 0, "max_tokens": 32}
    alone, together = alone_then_together(contract, FOUR_QUESTIONS, body)
    assert together == alone
    stats = contract.stats()
    assert stats["engine_requests"] == 0 and stats["kv_cache_usage"] == 0.0
