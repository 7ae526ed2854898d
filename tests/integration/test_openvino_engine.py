"""The OpenVINO engine passes the shared serving contract (tests/integration/engine_contract.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BUNDLED_MODEL
from tests.integration.engine_contract import Contract, EngineContract, contract_env
from tests.server_process import ServerProcess


class TestOpenVINOEngine(EngineContract):
    @pytest.fixture(scope="class")
    @classmethod
    def contract(
        cls, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Contract]:
        env = contract_env(models_dir, BUNDLED_MODEL)
        with ServerProcess.start(tmp_path_factory.mktemp("ov_contract"), env=env) as server:
            yield Contract(server, BUNDLED_MODEL)
