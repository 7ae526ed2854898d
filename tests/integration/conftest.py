"""Session fixtures for the GLM-family tests: tiny checkpoints in every hub layout, exported
once per session with the user's own command (``medserve export``), several at a time."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

# Two cores, but much of an export is interpreter start-up and file I/O: three overlap well.
EXPORT_WORKERS = 3
FP16_EXPORTS = (
    "tiny-chatglm2",
    "tiny-chatglm3",
    "tiny-glm4-chatglm",
    "tiny-glm4-hf",
    "tiny-glm4-0414",
)


@dataclass(frozen=True)
class ExportJob:
    checkpoint: str
    weight_format: str
    reference: str | None = None
    """Name of an export to gate accuracy against (``--reference``)."""

    @property
    def name(self) -> str:
        return f"{self.checkpoint}-{self.weight_format}"


# One int8 and one int4 per layout (chatglm, glm, glm4); the int8 ones pass the accuracy gate.
QUANTIZED_EXPORTS = (
    ExportJob("tiny-glm4-chatglm", "fp32"),
    ExportJob("tiny-chatglm3", "int8", reference="tiny-chatglm3-fp16"),
    ExportJob("tiny-chatglm2", "int4"),
    ExportJob("tiny-glm4-hf", "int8", reference="tiny-glm4-hf-fp16"),
    ExportJob("tiny-glm4-hf", "int4"),
    ExportJob("tiny-glm4-0414", "int8", reference="tiny-glm4-0414-fp16"),
    ExportJob("tiny-glm4-0414", "int4"),
)


@pytest.fixture(scope="session")
def glm_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny checkpoint of models/tiny_chatglm.py, as downloaded from its hub repo."""
    from medserve.models.tiny_chatglm import SPECS, build_tiny_checkpoint

    root = tmp_path_factory.mktemp("glm_checkpoints")
    return {name: build_tiny_checkpoint(name, root / name) for name in SPECS}


@pytest.fixture(scope="session")
def glm_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("glm_models") / "models"


@pytest.fixture(scope="session")
def glm_fp16_exports(glm_checkpoints: dict[str, Path], glm_models_dir: Path) -> dict[str, Path]:
    """``<checkpoint>-fp16`` exports of every layout, keyed by export name."""
    jobs = [ExportJob(name, "fp16") for name in FP16_EXPORTS]
    return _run_exports(jobs, glm_checkpoints, glm_models_dir)


@pytest.fixture(scope="session")
def glm_quantized_exports(
    glm_checkpoints: dict[str, Path], glm_models_dir: Path, glm_fp16_exports: dict[str, Path]
) -> dict[str, Path]:
    """fp32 / int8 / int4 exports (``QUANTIZED_EXPORTS``), after the fp16 ones they gate on."""
    return _run_exports(QUANTIZED_EXPORTS, glm_checkpoints, glm_models_dir)


def run_export(
    args: Iterable[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``medserve export ARGS`` as a user runs it (the CLI entry point, a fresh process)."""
    return subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", "export", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
        check=False,
    )


def _run_exports(
    jobs: Iterable[ExportJob], checkpoints: dict[str, Path], models_dir: Path
) -> dict[str, Path]:
    def export(job: ExportJob) -> Path:
        args = [
            "--hf-dir", str(checkpoints[job.checkpoint]),
            "--name", job.name,
            "--weight-format", job.weight_format,
            "--models-dir", str(models_dir),
        ]  # fmt: skip
        if job.reference:
            args += ["--reference", str(models_dir / job.reference)]
        result = run_export(args)
        if result.returncode != 0:
            raise AssertionError(f"export {job.name} failed:\n{result.stderr[-4000:]}")
        return models_dir / job.name

    with ThreadPoolExecutor(EXPORT_WORKERS) as pool:
        futures = {job.name: pool.submit(export, job) for job in jobs}
        return {name: future.result() for name, future in futures.items()}
