"""`medserve export` on tiny checkpoints in every GLM-family hub layout, checked numerically.

- ``chatglm`` (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat): converted to ``glm`` without running
  the folder's code, exported in the converter venv; compared with fixtures from the upstream
  ``modeling_chatglm.py`` (tests/data/chatglm/README.md: how they were made).
- ``glm`` (GLM-4-9B-chat-hf, the README example) and ``glm4`` (GLM-4-9B-0414): compared with
  transformers' own PyTorch modules.
Logits at every prompt position within tolerance, and the greedy 32-token continuation
through OpenVINO GenAI equal token for token; int8/int4 exports load and generate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from medserve.models.tiny_chatglm import REMOTE_CODE_MARKER, SPECS, weights_fingerprint
from medserve.quant.export import is_valid_model_dir, read_manifest

from tests.chatglm_reference import (
    Reference,
    fixture_reference,
    genai_greedy,
    ir_logits,
    transformers_reference,
)
from tests.integration.conftest import FP16_EXPORTS, QUANTIZED_EXPORTS, run_export

ov_genai = pytest.importorskip("openvino_genai")

# Logits of the tiny models spread over ~4 units (std). An fp32 IR differs from the oracle
# only by f32 arithmetic order (seen <= 3e-4). An fp16 IR keeps the fp16/bf16 weights
# exactly but also stores the rotary frequencies in fp16, an error growing with the position
# (seen 6e-3 at position 64 of GLM-4-0414). A wrong rotary layout or split is off by O(1).
FP32_ATOL = 1e-3
FP16_ATOL = 1e-2


def _reference(name: str, checkpoint: Path) -> Reference:
    if SPECS[name].layout != "chatglm":
        return transformers_reference(checkpoint)
    reference, meta = fixture_reference(name)
    assert weights_fingerprint(checkpoint) == meta["weights_sha256"], (
        f"{name} no longer has the weights the oracle fixture was made from: regenerate "
        f"tests/data/chatglm/model_{name}.npz as tests/data/chatglm/README.md describes"
    )
    return reference


@pytest.mark.parametrize("name", FP16_EXPORTS)
def test_fp16_export_matches_the_reference(
    name: str, glm_checkpoints: dict[str, Path], glm_fp16_exports: dict[str, Path]
) -> None:
    reference = _reference(name, glm_checkpoints[name])
    model_dir = glm_fp16_exports[f"{name}-fp16"]
    logits = ir_logits(model_dir, reference.prompt_ids)
    assert logits.shape == reference.logits.shape
    np.testing.assert_allclose(logits, reference.logits, atol=FP16_ATOL, rtol=0)
    assert genai_greedy(model_dir, reference.prompt_ids) == reference.greedy_ids


def test_fp32_export_matches_the_oracle(
    glm_checkpoints: dict[str, Path], glm_quantized_exports: dict[str, Path]
) -> None:
    reference = _reference("tiny-glm4-chatglm", glm_checkpoints["tiny-glm4-chatglm"])
    model_dir = glm_quantized_exports["tiny-glm4-chatglm-fp32"]
    np.testing.assert_allclose(
        ir_logits(model_dir, reference.prompt_ids), reference.logits, atol=FP32_ATOL, rtol=0
    )
    assert genai_greedy(model_dir, reference.prompt_ids) == reference.greedy_ids


@pytest.mark.parametrize("job", [j for j in QUANTIZED_EXPORTS if j.weight_format != "fp32"])
def test_quantized_export_loads_and_generates(
    job: object, glm_checkpoints: dict[str, Path], glm_quantized_exports: dict[str, Path]
) -> None:
    model_dir = glm_quantized_exports[job.name]
    assert is_valid_model_dir(model_dir)
    manifest = read_manifest(model_dir)
    assert manifest is not None and manifest["precision"] == job.weight_format
    if job.reference:  # the accuracy gate ran and its measurement was recorded
        assert (
            manifest["accuracy"]["relative_increase"]
            <= manifest["accuracy"]["max_relative_increase"]
        )
    tokens = genai_greedy(model_dir, [1, 2, 3, 4], new_tokens=8)
    assert len(tokens) == 8
    assert all(0 <= t < SPECS[job.checkpoint].vocab_size for t in tokens)


@pytest.mark.parametrize("name", FP16_EXPORTS)
def test_manifest_and_stop_tokens(name: str, glm_fp16_exports: dict[str, Path]) -> None:
    model_dir = glm_fp16_exports[f"{name}-fp16"]
    spec = SPECS[name]
    manifest = read_manifest(model_dir)
    assert manifest is not None
    assert manifest["architecture"] == spec.layout
    assert manifest["source"]["exported_as"] == ("glm" if spec.layout == "chatglm" else spec.layout)
    assert manifest["context_length"] == 2048
    tokenizer = ov_genai.Tokenizer(str(model_dir))
    stops = ["<|user|>", "<|observation|>"] if spec.tokenizer_family != "chatglm2" else []
    stops.append("<|endoftext|>" if spec.tokenizer_family.startswith("glm4") else "</s>")
    expected = {tokenizer.encode(t, add_special_tokens=False).input_ids.data[0][-1] for t in stops}
    generation = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    eos = generation["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == expected
    pipeline_config = ov_genai.LLMPipeline(str(model_dir), "CPU").get_generation_config()
    assert expected <= set(pipeline_config.stop_token_ids) | {pipeline_config.eos_token_id}


def test_no_code_from_a_checkpoint_ran(
    glm_checkpoints: dict[str, Path],
    glm_fp16_exports: dict[str, Path],
    glm_quantized_exports: dict[str, Path],
) -> None:
    chatglm = [n for n, s in SPECS.items() if s.layout == "chatglm"]
    for name in chatglm:
        folder = glm_checkpoints[name]
        # The stand-ins are there, and would have left the marker had anything imported them.
        assert (folder / "modeling_chatglm.py").is_file()
        assert not (folder / REMOTE_CODE_MARKER).exists(), f"remote code ran from {folder}"
    for model_dir in [*glm_fp16_exports.values(), *glm_quantized_exports.values()]:
        assert not list(model_dir.glob("*.py")), f"{model_dir} carries Python files"


def test_glm_export_names_the_missing_converter_venv(
    glm_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    result = run_export(
        [
            "--hf-dir",
            str(glm_checkpoints["tiny-glm4-hf"]),
            "--name",
            "never-built",
            "--weight-format",
            "fp16",
            "--models-dir",
            str(tmp_path),
        ],
        env={"MEDSERVE_CONVERT_GLM_VENV": str(tmp_path / "no-such-venv")},
    )
    assert result.returncode == 1
    assert "bash installer/setup.sh" in result.stderr
    assert str(tmp_path / "no-such-venv") in result.stderr
    assert not (tmp_path / "never-built").exists()


def test_chatglm_v1_is_refused_clearly(tmp_path: Path) -> None:
    # ChatGLM-6B (first generation): 2D positions, no native transformers layout.
    config = {"model_type": "chatglm", "position_encoding_2d": True, "max_sequence_length": 2048}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = run_export(
        [
            "--hf-dir",
            str(tmp_path),
            "--name",
            "v1",
            "--weight-format",
            "fp16",
            "--models-dir",
            str(tmp_path / "models"),
        ]
    )
    assert result.returncode == 1
    assert "first-generation ChatGLM-6B" in result.stderr
