"""Shared fixtures: the network guard, the prepared bundled model, a real server over HTTP."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR / "netguard"))
import loopback_only  # noqa: E402

loopback_only.install()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from tests.server_process import ServerProcess  # noqa: E402

BUNDLED_MODEL = "smollm2-135m-instruct"


def medserve_home() -> Path:
    return Path(os.environ.get("MEDSERVE_HOME", Path.home() / ".medserve")).expanduser()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    models = medserve_home() / "models"
    if not (models / BUNDLED_MODEL / "medserve.json").is_file():
        pytest.fail(
            f"bundled model not prepared in {models}; run `bash installer/setup.sh` first",
            pytrace=False,
        )
    return models


@pytest.fixture(scope="session")
def tiny_glm4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight GLM-4 exported to IR, built once per test session."""
    from medserve.models.tiny_glm4 import build_tiny_glm4

    return build_tiny_glm4(tmp_path_factory.mktemp("glm4") / "models" / "tiny-glm4", seed=0)


@pytest.fixture(scope="session")
def llm_server(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One real medserve server on the bundled model, shared by the API tests."""
    log_dir = tmp_path_factory.mktemp("llm_server")
    with ServerProcess.start(
        log_dir,
        env={
            "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
            "MEDSERVE_ENGINE_MAX_NUM_SEQS": "4",
            "MEDSERVE_ENGINE_KV_CACHE_GB": "1",
            # off so that freed KV blocks read as zero usage in the disconnect test
            "MEDSERVE_ENGINE_ENABLE_PREFIX_CACHING": "false",
            "MEDSERVE_SERVER_MAX_BODY_BYTES": "65536",
            "MEDSERVE_CASES_ENABLED": "false",
        },
    ) as server:
        yield server
