"""`medserve export --engine llama-cpp --gguf FILE`: a GGUF served as it is, never converted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from medserve.installer.bundled_model import GGUF_MEMBER, GGUF_SHA256

from tests.conftest import medserve_home


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", "export", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def bundled_gguf() -> Path:
    path = medserve_home() / "downloads" / Path(GGUF_MEMBER).name
    if not path.is_file():
        pytest.fail(f"{path} missing; run `medserve setup`", pytrace=False)
    return path


def test_a_gguf_file_becomes_a_llama_cpp_model_folder(bundled_gguf: Path, tmp_path: Path) -> None:
    result = _export(
        "--engine", "llama-cpp", "--gguf", str(bundled_gguf), "--name", "smol-gguf",
        "--models-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "smol-gguf"
    manifest = json.loads((folder / "medserve.json").read_text())
    assert manifest["engine"] == "llama-cpp" and manifest["format"] == "gguf"
    assert manifest["precision"] == "q4_1" and manifest["architecture"] == "llama"
    assert manifest["context_length"] == 8192
    assert manifest["source"]["sha256"] == GGUF_SHA256
    assert {p.name for p in folder.iterdir()} == {"medserve.json", "model.gguf"}


def test_a_file_that_is_not_gguf_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_bytes(b"patient notes, not a model" * 100)
    models = tmp_path / "models"
    result = _export(
        "--engine", "llama-cpp", "--gguf", str(fake), "--name", "bad", "--models-dir", str(models)
    )  # fmt: skip
    assert result.returncode == 1
    assert "not a readable GGUF file" in result.stderr
    assert not (models / "bad").exists()
    assert not (models / ".bad.partial").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gguf", "x.gguf", "--name", "n"], "--gguf needs --engine llama-cpp"),
        (
            ["--engine", "llama-cpp", "--gguf", "x.gguf", "--name", "n", "--weight-format", "Q8_0"],
            "no --weight-format",
        ),
        (
            ["--engine", "chatglm-cpp", "--hf-dir", ".", "--name", "n", "--weight-format", "int8"],
            "--weight-format is one of q4_0, q8_0, f16, f32",
        ),
        (
            ["--engine", "llama-cpp", "--hf-dir", ".", "--name", "n", "--weight-format", "q4"],
            "--weight-format is one of Q4_0, Q4_K_M, Q8_0, F16, F32",
        ),
        (["--engine", "llama-cpp", "--hf-dir", ".", "--name", "n"], "--weight-format is required"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(args: list[str], message: str) -> None:
    result = _export(*args)
    assert result.returncode == 2
    assert message in result.stderr
