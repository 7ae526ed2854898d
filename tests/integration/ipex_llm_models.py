"""PyTorch-engine folders of the bundled model (ipex-llm low-bit, IPEX bf16), built once per
test session.

Several test modules serve them (the engine contract, LangChain); a folder is quantized by
the first that asks, with the user's own command (``medserve quantize``), and found finished
(its medserve.json) by the others. Skips only when the engine's venv (.venv-ipex-llm,
.venv-ipex) is absent and MEDSERVE_REQUIRE_ENGINES does not name the engine: CI names
ipex-llm, so CI never skips it silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from medserve.accel.registry import EngineNotInstalled, worker_python

ENGINE = "ipex-llm"
HF_DIR_NAME = "smollm2-135m-instruct"
"""The bundled model's HF folder under $MEDSERVE_HOME/hf (written by `medserve setup`)."""


def engine_required(engine: str) -> bool:
    names = os.environ.get("MEDSERVE_REQUIRE_ENGINES", "").replace(",", " ").split()
    return engine in names


def require_engine(engine: str = ENGINE) -> None:
    """Skip (or fail, when CI requires the engine) if its virtual environment is missing."""
    try:
        worker_python(engine)
    except EngineNotInstalled as exc:
        if engine_required(engine):
            pytest.fail(f"MEDSERVE_REQUIRE_ENGINES names {engine}, but {exc}", pytrace=False)
        pytest.skip(f"{exc} (set MEDSERVE_REQUIRE_ENGINES={engine} to make this a failure)")


def run_quantize(*args: str, engine: str = ENGINE) -> subprocess.CompletedProcess[str]:
    """``medserve quantize ARGS`` as a user runs it (the CLI entry point, a fresh process)."""
    return subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", "quantize", "--engine", engine, *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def quantized_bundled_model(
    tmp_path_factory: pytest.TempPathFactory, hf_dir: Path, low_bit: str, engine: str = ENGINE
) -> tuple[Path, str]:
    """(models dir, model name) of the bundled model at ``low_bit``, quantizing it if needed."""
    require_engine(engine)
    models_dir = tmp_path_factory.getbasetemp() / f"{engine}-models"
    name = f"smollm2-{engine}-{low_bit.replace('_', '-')}"
    if not (models_dir / name / "medserve.json").is_file():
        result = run_quantize(
            "--hf-dir", str(hf_dir),
            "--low-bit", low_bit,
            "--name", name,
            "--models-dir", str(models_dir),
            engine=engine,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(f"medserve quantize {low_bit} failed:\n{result.stderr[-4000:]}")
    return models_dir, name


def serving_dir(tmp_path: Path, *models: Path) -> Path:
    """A models dir holding these model folders (symlinked), to serve them side by side."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for model in models:
        link = tmp_path / model.name
        if not link.exists():
            link.symlink_to(model, target_is_directory=True)
    return tmp_path
