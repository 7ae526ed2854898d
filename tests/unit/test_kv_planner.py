"""KV planning arithmetic against hand-computed figures for real model geometries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from medserve.kv_cache.planner import (
    KVGeometry,
    KVPlanError,
    check_fits_in_memory,
    plan_kv_cache,
)

SMOLLM2 = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
}
# GLM-4-9B: 40 layers, 32 heads, 2 KV groups, hidden 4096 (head_dim derived: 128)
GLM4_9B = {
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "hidden_size": 4096,
}


def test_bytes_per_token_by_precision() -> None:
    smol = KVGeometry.from_hf_config(SMOLLM2)
    # K and V, 30 layers, 3 heads, 64 dims: 11,520 elements per token
    assert smol.bytes_per_token("f16") == 2 * 30 * 3 * 64 * 2
    assert smol.bytes_per_token("f32") == 2 * 30 * 3 * 64 * 4
    assert smol.bytes_per_token("u8") == 2 * 30 * 3 * (64 + 8)
    glm = KVGeometry.from_hf_config(GLM4_9B)
    assert glm.head_dim == 128
    assert glm.bytes_per_token("bf16") == 2 * 40 * 2 * 128 * 2
    with pytest.raises(KVPlanError, match="unknown KV precision"):
        smol.bytes_per_token("int3")


def test_plan_capacity_in_whole_blocks() -> None:
    plan = plan_kv_cache(KVGeometry.from_hf_config(SMOLLM2), cache_gb=1.0, precision="f16")
    per_block = 2 * 30 * 3 * 64 * 2 * 32
    assert plan.num_blocks == 1024**3 // per_block
    assert plan.capacity_tokens == plan.num_blocks * 32
    assert plan.full_context_sequences(4096) == plan.capacity_tokens // 4096
    with pytest.raises(KVPlanError, match="kv_cache_gb"):
        plan_kv_cache(KVGeometry.from_hf_config(SMOLLM2), cache_gb=0)


def test_missing_geometry_is_a_clear_error() -> None:
    with pytest.raises(KVPlanError, match="attention geometry"):
        KVGeometry.from_hf_config({"hidden_size": 10})


def test_memory_check_counts_weights_and_pools(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "openvino_model.bin").write_bytes(b"\0" * 1024**2)
    (model / "config.json").write_text(json.dumps(SMOLLM2))
    needed = check_fits_in_memory({"m": model}, cache_gb=1.0, total_ram=16 * 1024**3)
    assert needed == 1024**3 + 1024**2
    with pytest.raises(KVPlanError) as error:
        check_fits_in_memory({"a": model, "b": model}, cache_gb=4.0, total_ram=8 * 1024**3)
    assert "engine.kv_cache_gb=4" in str(error.value) and "2 model(s)" in str(error.value)


def test_weight_bytes_follow_the_manifest_format(tmp_path: Path) -> None:
    from medserve.kv_cache.planner import model_weight_bytes
    from medserve.models.manifest import ModelManifest, write_manifest

    ir = tmp_path / "ir"
    ir.mkdir()
    (ir / "openvino_model.bin").write_bytes(b"\0" * 1000)
    (ir / "openvino_tokenizer.bin").write_bytes(b"\0" * 50)  # not weights kept per token
    write_manifest(ir, ModelManifest(name="ir", precision="int8"))
    assert model_weight_bytes(ir) == 1000

    low_bit = tmp_path / "low-bit"
    low_bit.mkdir()
    (low_bit / "pytorch_model.bin").write_bytes(b"\0" * 700)
    (low_bit / "model.safetensors").write_bytes(b"\0" * 300)
    write_manifest(
        low_bit,
        ModelManifest(
            name="lb", precision="sym_int4", engine="ipex-llm", format="ipex-llm-low-bit"
        ),
    )
    assert model_weight_bytes(low_bit) == 1000
