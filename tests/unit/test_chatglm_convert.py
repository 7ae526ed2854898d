"""chatglm -> glm weight conversion, checked against the upstream oracle without OpenVINO.

The converted folder is loaded by transformers' own ``GlmForCausalLM``; its fp32 logits must
equal those of the upstream ``modeling_chatglm.py`` recorded in tests/data/chatglm (how they
were made: tests/data/chatglm/README.md). That isolates the conversion (split, names, rotary,
norms) from the export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from medserve.models.chatglm_convert import (
    AttentionShape,
    ChatGLMConversionError,
    convert_chatglm_checkpoint,
    convert_tensor,
    glm_config,
    source_weight_files,
    split_qkv,
)
from medserve.models.layouts import LayoutError, detect_layout, export_python
from medserve.models.tiny_chatglm import REMOTE_CODE_MARKER, SPECS, build_tiny_checkpoint

from tests.chatglm_reference import fixture_reference

CHATGLM = [name for name, spec in SPECS.items() if spec.layout == "chatglm"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_checkpoint(name, root / name) for name in SPECS}


@pytest.mark.parametrize(
    ("name", "model_type", "converts", "env"),
    [
        ("tiny-chatglm2", "chatglm", True, "convert-glm"),
        ("tiny-chatglm3", "chatglm", True, "convert-glm"),
        ("tiny-glm4-chatglm", "chatglm", True, "convert-glm"),
        ("tiny-glm4-hf", "glm", False, "convert-glm"),
        ("tiny-glm4-0414", "glm4", False, "main"),
    ],
)
def test_layout_detection(
    name: str, model_type: str, converts: bool, env: str, checkpoints: dict[str, Path]
) -> None:
    layout = detect_layout(checkpoints[name])
    assert (layout.model_type, layout.convert_chatglm, layout.export_env) == (
        model_type,
        converts,
        env,
    )
    if model_type == "chatglm":
        expected = "GLM-4-9B-chat" if "glm4" in name else "ChatGLM2/3-6B"
        assert layout.family == expected


def test_missing_converter_venv_is_named(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDSERVE_CONVERT_GLM_VENV", str(tmp_path / "absent"))
    with pytest.raises(LayoutError, match=r"bash installer/setup\.sh"):
        export_python(detect_layout(checkpoints["tiny-glm4-hf"]))


@pytest.mark.parametrize("grouped", [True, False])
def test_split_qkv_undoes_the_chatglm_fusion(grouped: bool) -> None:
    heads, kv, dim, hidden = 4, 2 if grouped else 4, 8, 16
    q = torch.randn(heads * dim, hidden)
    k = torch.randn(kv * dim, hidden)
    v = torch.randn(kv * dim, hidden)
    if grouped:  # multi-query: [all q | all k | all v]
        fused = torch.cat([q, k, v])
    else:  # per head: [q_h | k_h | v_h] for each head h
        per = [t.reshape(heads, dim, hidden) for t in (q, k, v)]
        fused = torch.stack(per, dim=1).reshape(-1, hidden)
    parts = split_qkv(fused, AttentionShape(heads, kv, dim, grouped))
    for got, want in zip(parts, (q, k, v), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", CHATGLM)
def test_converted_weights_reproduce_the_upstream_model(
    name: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = convert_chatglm_checkpoint(checkpoints[name], tmp_path / "glm")
    reference, _ = fixture_reference(name)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model).__name__ == "GlmForCausalLM"
    with torch.no_grad():
        logits = model(torch.tensor([reference.prompt_ids]), use_cache=False).logits[0]
    np.testing.assert_allclose(logits.numpy(), reference.logits, atol=1e-4, rtol=0)
    ids = list(reference.prompt_ids)
    with torch.no_grad():
        for _ in range(len(reference.greedy_ids)):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert ids[len(reference.prompt_ids) :] == reference.greedy_ids
    assert not (checkpoints[name] / REMOTE_CODE_MARKER).exists()


def test_conversion_streams_shard_by_shard(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    source = checkpoints["tiny-glm4-chatglm"]
    out = convert_chatglm_checkpoint(source, tmp_path / "glm")
    index = json.loads((out / "model.safetensors.index.json").read_text(encoding="utf-8"))
    source_index = json.loads((source / "model.safetensors.index.json").read_text("utf-8"))
    # Each output shard holds exactly the tensors of its input shard: one shard in memory.
    assert len(set(index["weight_map"].values())) == len(source_weight_files(source))
    assert index["weight_map"]["model.layers.1.self_attn.q_proj.weight"].startswith("model-00002")
    assert source_index["weight_map"]["transformer.encoder.layers.1.input_layernorm.weight"] == (
        "model-00002-of-00002.safetensors"
    )
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["rope_theta"] == 10000.0 * 500 and config["partial_rotary_factor"] == 0.5
    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert len(generation["eos_token_id"]) == 3  # <|endoftext|>, <|user|>, <|observation|>


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rmsnorm", False),
        ("post_layer_norm", False),
        ("add_bias_linear", True),
        ("apply_residual_connection_post_layernorm", True),
        ("quantization_bit", 4),
        ("pre_seq_len", 128),
    ],
)
def test_inexact_variants_are_refused(key: str, value: object, checkpoints: dict) -> None:
    config = json.loads((checkpoints["tiny-chatglm3"] / "config.json").read_text("utf-8"))
    config[key] = value
    with pytest.raises(ChatGLMConversionError, match=key):
        glm_config(config, [2], 0)


def test_unknown_tensors_are_refused() -> None:
    shape = AttentionShape(4, 2, 16, True)
    with pytest.raises(ChatGLMConversionError, match="prefix_encoder"):
        convert_tensor("transformer.prefix_encoder.embedding.weight", torch.zeros(1), shape)
    with pytest.raises(ChatGLMConversionError, match="weight_scale"):
        name = "transformer.encoder.layers.0.self_attention.query_key_value.weight_scale"
        convert_tensor(name, torch.zeros(1), shape)


def test_the_remote_code_marker_would_catch_an_import(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    # Positive control for the "no remote code ran" checks: the stand-ins leave the marker.
    import runpy
    import shutil

    folder = shutil.copytree(checkpoints["tiny-glm4-chatglm"], tmp_path / "copy")
    with pytest.raises(RuntimeError, match="remote code"):
        runpy.run_path(str(folder / "modeling_chatglm.py"))
    assert (folder / REMOTE_CODE_MARKER).exists()
