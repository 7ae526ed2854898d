"""medserve's writer of chatglm.cpp model files, checked without chatglm.cpp installed.

The layout asserted here is the one chatglm.cpp 0.4.2's loader reads (``Pipeline::Pipeline``
and ``ModelLoader::read_state_dict`` in chatglm.cpp): magic, model type, version, the
``ModelConfigRecordV2`` fields, the tokenizer, then tensor records with 16-byte-aligned data;
the quantized blocks are compared with scalar ports of ggml's ``quantize_row_q8_0_reference``
/ ``quantize_row_q4_0_reference`` (ggml-quants.c), written here independently of ``gguf``.
The integration tests (tests/integration/test_chatglm_cpp_engine.py) load the files in the
real engine.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from medserve.models.layouts import LayoutError
from medserve.models.manifest import read_manifest
from medserve.quant.chatglm_cpp_export import (
    MODEL_FILE,
    ConfigRecord,
    GGMLType,
    ModelType,
    encode_rows,
    export_chatglm_cpp,
    read_header,
    read_tensor_records,
    write_header,
    write_tensor,
)

RECORD = ConfigRecord(
    dtype=int(GGMLType.Q8_0), vocab_size=640, hidden_size=64, num_attention_heads=4,
    num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128, norm_eps=2**-16,
    num_virtual_tokens=0, rope_theta=500000.0, max_length=2048, eos_token_id=2, pad_token_id=0,
)  # fmt: skip


def _f16(x: float) -> bytes:
    return np.float16(x).tobytes()


def reference_q8_0(block: np.ndarray) -> bytes:
    """ggml's quantize_row_q8_0_reference for one block of 32 values, element by element."""
    amax = max(abs(float(v)) for v in block)
    d = np.float32(amax) / np.float32(127)
    inv = np.float32(1) / d if d else np.float32(0)
    quants = []
    for v in block:
        x = float(np.float32(v) * inv)
        quants.append(int(np.sign(x) * np.floor(abs(x) + 0.5)))  # C roundf: half away from 0
    return _f16(d) + np.array(quants, dtype=np.int8).tobytes()


def reference_q4_0(block: np.ndarray) -> bytes:
    """ggml's quantize_row_q4_0_reference: d = (value of largest magnitude) / -8, nibbles."""
    index = int(np.argmax(np.abs(block)))
    d = np.float32(block[index]) / np.float32(-8)
    inv = np.float32(1) / d if d else np.float32(0)
    q = [min(15, int(np.float32(v) * inv + np.float32(8.5))) for v in block]
    packed = bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return _f16(d) + packed


def test_header_fields_are_where_chatglm_cpp_reads_them() -> None:
    f = io.BytesIO()
    write_header(f, ModelType.CHATGLM3, RECORD, b"\x0atokenizer-bytes")
    data = f.getvalue()
    assert data[:4] == b"ggml"
    assert struct.unpack_from("<ii", data, 4) == (3, 2)  # model type, then version
    fields = struct.unpack_from("<iiiiiiififiii", data, 12)
    assert fields == (8, 640, 64, 4, 2, 2, 128, 2**-16, 0, 500000.0, 2048, 2, 0)
    assert struct.unpack_from("<i", data, 12 + 52) == (16,)
    assert data[68:] == b"\x0atokenizer-bytes"


def test_tensor_records_round_trip_with_aligned_data(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    weight = np.arange(96 * 64, dtype=np.float32).reshape(96, 64) / 1000
    norm = np.linspace(0.5, 1.5, 64, dtype=np.float32)
    with open(path, "wb") as f:
        write_header(f, ModelType.CHATGLM4, RECORD, b"abc 0\n")
        write_tensor(f, "w", weight, GGMLType.F16)
        write_tensor(f, "layers.0.norm", norm, GGMLType.F32)
    header = read_header(path)
    assert header.model_type == ModelType.CHATGLM4 and header.config == RECORD
    assert header.tokenizer == b"abc 0\n"
    records = read_tensor_records(path)
    assert [(r.name, r.shape, r.ggml_type) for r in records] == [
        ("w", (96, 64), GGMLType.F16),
        ("layers.0.norm", (64,), GGMLType.F32),
    ]
    data = path.read_bytes()
    assert all(r.offset % 16 == 0 for r in records)
    assert records[-1].offset + records[-1].nbytes == len(data)  # nothing after the last
    # Dims are stored outermost first (chatglm.cpp reverses them into ggml's ne[]).
    name_end = header.tensors_offset + 4 + 1
    assert struct.unpack_from("<iiii", data, name_end) == (2, 96, 64, int(GGMLType.F16))
    w = np.frombuffer(data, np.float16, 96 * 64, records[0].offset).reshape(96, 64)
    np.testing.assert_array_equal(w, weight.astype(np.float16))
    np.testing.assert_array_equal(np.frombuffer(data, np.float32, 64, records[1].offset), norm)


@pytest.mark.parametrize(
    ("ggml_type", "reference", "block_bytes"),
    [(GGMLType.Q8_0, reference_q8_0, 34), (GGMLType.Q4_0, reference_q4_0, 18)],
)
def test_quantized_blocks_are_ggmls(ggml_type: GGMLType, reference, block_bytes: int) -> None:
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((3, 96)).astype(np.float32)
    rows[1, :32] = 0.0  # an all-zero block: scale 0, no division by zero
    encoded = encode_rows(rows, ggml_type).tobytes()
    assert len(encoded) == rows.size // 32 * block_bytes
    expected = b"".join(reference(block) for block in rows.reshape(-1, 32))
    assert encoded == expected


@pytest.mark.parametrize("ggml_type", [GGMLType.Q8_0, GGMLType.Q4_0])
def test_quantized_round_trip_is_within_a_quant_step(ggml_type: GGMLType) -> None:
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(11)
    rows = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
    encoded = encode_rows(rows, ggml_type)
    decoded = quants.dequantize(encoded, GGMLQuantizationType(int(ggml_type))).reshape(rows.shape)
    values = rows.reshape(-1, 32)
    error = np.abs(decoded.reshape(-1, 32) - values)
    # The f16 rounding of each block's scale moves a value by up to 2^-11 of itself.
    scale_rounding = np.abs(values) * 2.0**-10 + 1e-7
    amax = np.abs(values).max(axis=1, keepdims=True)
    if ggml_type == GGMLType.Q8_0:  # symmetric: round to the nearest of 255 levels
        assert np.all(error <= amax / 127 / 2 + scale_rounding)
    else:
        # [-8, 7] x (max / -8): half a step, except on the clipped side, at most a step.
        step = amax / 8
        assert np.all(error <= step + scale_rounding)
        assert np.mean(error <= step / 2 + scale_rounding) > 0.95


def test_quantized_type_refuses_rows_not_made_of_blocks() -> None:
    with pytest.raises(LayoutError, match="export this checkpoint as f16"):
        write_tensor(io.BytesIO(), "w", np.zeros((4, 40), np.float32), GGMLType.Q4_0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from medserve.models.tiny_chatglm import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    names = ("tiny-chatglm3", "tiny-glm4-chatglm", "tiny-glm4-hf")
    return {name: build_tiny_checkpoint(name, root / name) for name in names}


def _source_tensors(folder: Path) -> dict[str, np.ndarray]:
    from medserve.quant.chatglm_cpp_export import checkpoint_tensors

    return {
        name: np.asarray(values, dtype=np.float32)
        for path in sorted(folder.glob("*.safetensors"))
        for name, values in checkpoint_tensors(path)
    }


@pytest.mark.parametrize(
    ("name", "model_type", "rope_theta", "eos"),
    [
        ("tiny-chatglm3", ModelType.CHATGLM3, 10000.0, "</s>"),
        ("tiny-glm4-chatglm", ModelType.CHATGLM4, 5000000.0, "<|endoftext|>"),
    ],
)
def test_export_writes_the_checkpoint_as_chatglm_cpp_reads_it(
    name: str,
    model_type: ModelType,
    rope_theta: float,
    eos: str,
    checkpoints: dict[str, Path],
    tmp_path: Path,
) -> None:
    hf_dir = checkpoints[name]
    out = export_chatglm_cpp(hf_dir, tmp_path, "m", "f32", progress=False)
    config = json.loads((hf_dir / "config.json").read_text())
    header = read_header(out / MODEL_FILE)
    assert header.model_type == model_type
    assert header.config.vocab_size == config["padded_vocab_size"]
    assert header.config.num_key_value_heads == config["multi_query_group_num"]
    assert header.config.max_length == config["seq_length"]
    assert header.config.rope_theta == rope_theta
    assert header.config.norm_eps == pytest.approx(config["layernorm_epsilon"])
    assert header.tokenizer == (hf_dir / "tokenizer.model").read_bytes()
    eos_ids = config["eos_token_id"]
    assert header.config.eos_token_id == (eos_ids[0] if isinstance(eos_ids, list) else eos_ids)
    # f32: every tensor exactly as in the checkpoint (bf16/fp16 widen exactly), no extras.
    source = _source_tensors(hf_dir)
    del source["transformer.rotary_pos_emb.inv_freq"]
    data = (out / MODEL_FILE).read_bytes()
    records = {r.name: r for r in read_tensor_records(out / MODEL_FILE)}
    assert records.keys() == source.keys()
    for tensor_name, values in source.items():
        r = records[tensor_name]
        assert r.shape == values.shape and r.ggml_type == GGMLType.F32
        stored = np.frombuffer(data, np.float32, values.size, r.offset).reshape(values.shape)
        np.testing.assert_array_equal(stored, values)
    manifest = read_manifest(out)
    assert (manifest.engine, manifest.format, manifest.precision) == ("chatglm-cpp",) * 2 + ("f32",)
    assert manifest.context_length == config["seq_length"]
    assert set(manifest.source["sha256"]) >= {"tokenizer.model", "config.json"}
    assert eos  # documents which token the eos id is


def test_q4_0_export_quantizes_2d_weights_only(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = export_chatglm_cpp(checkpoints["tiny-chatglm3"], tmp_path, "q", "q4_0", progress=False)
    records = read_tensor_records(out / MODEL_FILE)
    assert read_header(out / MODEL_FILE).config.dtype == int(GGMLType.Q4_0)
    assert {r.ggml_type for r in records if len(r.shape) == 2} == {GGMLType.Q4_0}
    assert {r.ggml_type for r in records if len(r.shape) == 1} == {GGMLType.F32}
    assert read_manifest(out).precision == "q4_0"


def test_other_layouts_are_refused_with_advice(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(LayoutError, match=r"chatglm layout.*another engine"):
        export_chatglm_cpp(checkpoints["tiny-glm4-hf"], tmp_path, "x", "f16", progress=False)
    assert not (tmp_path / "x").exists()


def test_unsupported_variant_is_refused_naming_the_key(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    hf_dir = tmp_path / "ptuned"
    shutil.copytree(checkpoints["tiny-chatglm3"], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "pre_seq_len": 128}))
    with pytest.raises(LayoutError, match="pre_seq_len"):
        export_chatglm_cpp(hf_dir, tmp_path / "models", "x", "f16", progress=False)
    with pytest.raises(ValueError, match="weight_format"):
        export_chatglm_cpp(checkpoints["tiny-chatglm3"], tmp_path, "x", "int4", progress=False)
    assert not (tmp_path / "models" / "x").exists()
