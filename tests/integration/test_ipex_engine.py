"""The IPEX engine (intel-extension-for-pytorch, bf16 with ipex.llm.optimize) passes the
shared serving contract, beside the OpenVINO model.

Optional: .venv-ipex holds a ~6.4 GB CUDA build of torch 2.8 (the only one IPEX 2.8 takes
from PyPI), so CI does not install it; these tests skip, naming the install command, unless
MEDSERVE_REQUIRE_ENGINES names ipex.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BUNDLED_MODEL, medserve_home
from tests.integration.engine_contract import Contract, EngineContract, contract_env
from tests.integration.ipex_llm_models import HF_DIR_NAME, quantized_bundled_model, serving_dir
from tests.server_process import ServerProcess

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


class TestIpexBf16(EngineContract):
    @pytest.fixture(scope="class")
    @classmethod
    def contract(
        cls, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Contract]:
        hf_dir = medserve_home() / "hf" / HF_DIR_NAME
        built, name = quantized_bundled_model(tmp_path_factory, hf_dir, "bf16", engine="ipex")
        serve = serving_dir(
            tmp_path_factory.mktemp("ipex_contract") / "models",
            built / name,
            models_dir / BUNDLED_MODEL,
        )
        env = contract_env(serve, name, MEDSERVE_ENGINE_SERVED_MODELS=BUNDLED_MODEL)
        with ServerProcess.start(serve.parent, env=env) as server:
            yield Contract(server, name)

    def test_served_by_ipex_beside_openvino(self, contract: Contract) -> None:
        stats = httpx.get(contract.url("/metrics.json")).json()["models"]
        assert "ipex" in stats[contract.model]
        assert stats[contract.model]["pid"] != stats[BUNDLED_MODEL]["pid"]
        answer = contract.chat(messages=PARIS, temperature=0, max_tokens=24)
        assert "Paris" in answer.json()["choices"][0]["message"]["content"], answer.text
