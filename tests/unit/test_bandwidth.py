"""Bytes-per-token arithmetic of `medserve bench bandwidth`, on tiny models built here.

The GGUF files are written with the real `gguf` package and the IR folders with the real
OpenVINO serializer, so the parsing is checked against the formats as the tools write them.
Expected figures are computed from the tensor sizes chosen below, by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from medserve.benchmarks import bandwidth

VOCAB, HIDDEN = 64, 64
F32 = 4
RNG = np.random.default_rng(0)


def _matrix(rows: int, cols: int) -> np.ndarray:
    return RNG.standard_normal((rows, cols)).astype(np.float32)


def _write_gguf(path: Path, *, tied: bool) -> Path:
    """token_embd in Q8_0 (34 bytes per 32 values), one f32 matrix, output.weight if untied."""
    writer = gguf.GGUFWriter(str(path), "llama")
    embedding = gguf.quants.quantize(_matrix(VOCAB, HIDDEN), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("token_embd.weight", embedding, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", _matrix(HIDDEN, HIDDEN))
    if not tied:
        writer.add_tensor("output.weight", _matrix(VOCAB, HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


Q8_EMBEDDING = VOCAB * (HIDDEN // 32) * 34
Q8_ROW = (HIDDEN // 32) * 34
ATTN_Q = HIDDEN * HIDDEN * F32
OUTPUT = VOCAB * HIDDEN * F32


def test_gguf_tied_embedding_is_read_whole_once(tmp_path: Path) -> None:
    traffic = bandwidth.gguf_weight_traffic(_write_gguf(tmp_path / "tied.gguf", tied=True))
    assert traffic.stored_bytes == Q8_EMBEDDING + ATTN_Q
    assert traffic.per_token_bytes == Q8_EMBEDDING + ATTN_Q
    assert traffic.gathered == []


def test_gguf_untied_embedding_costs_one_row(tmp_path: Path) -> None:
    traffic = bandwidth.gguf_weight_traffic(_write_gguf(tmp_path / "untied.gguf", tied=False))
    assert traffic.stored_bytes == Q8_EMBEDDING + ATTN_Q + OUTPUT
    assert traffic.per_token_bytes == Q8_ROW + ATTN_Q + OUTPUT
    assert traffic.gathered == ["token_embd.weight"]


def _write_ir(folder: Path, *, tied: bool) -> Path:
    """An int8-decompressed embedding (u8 - zero point) * scale, as NNCF writes it, a Gather,
    one f32 matmul, and a head that is either the same table or an f32 matrix of its own."""
    ids = ops.parameter([1, -1], ov.Type.i64, name="input_ids")
    weights = ops.constant(RNG.integers(0, 255, (VOCAB, HIDDEN), dtype=np.uint8))
    zero_point = ops.constant(RNG.integers(0, 255, (VOCAB, 1), dtype=np.uint8))
    scale = ops.constant(RNG.random((VOCAB, 1), dtype=np.float32))
    table = ops.multiply(
        ops.subtract(ops.convert(weights, ov.Type.f32), ops.convert(zero_point, ov.Type.f32)),
        scale,
    )
    hidden = ops.gather(table, ids, ops.constant(np.int32(0)))
    hidden = ops.matmul(hidden, ops.constant(_matrix(HIDDEN, HIDDEN)), False, True)
    head = table if tied else ops.constant(_matrix(VOCAB, HIDDEN))
    logits = ops.matmul(hidden, head, False, True)
    folder.mkdir()
    ov.save_model(ov.Model([logits], [ids]), folder / "openvino_model.xml", compress_to_fp16=False)
    return folder


INT8_TABLE = VOCAB * HIDDEN + VOCAB + VOCAB * F32  # u8 weights, u8 zero points, f32 scales
INT8_ROW = HIDDEN + 1 + F32
AXIS = 4  # the Gather's int32 axis constant
MATMUL = HIDDEN * HIDDEN * F32


def test_openvino_tied_embedding_is_read_whole_once(tmp_path: Path) -> None:
    traffic = bandwidth.openvino_weight_traffic(_write_ir(tmp_path / "tied", tied=True))
    assert traffic.stored_bytes == INT8_TABLE + AXIS + MATMUL
    assert traffic.per_token_bytes == traffic.stored_bytes
    assert traffic.gathered == []


def test_openvino_untied_embedding_costs_one_row(tmp_path: Path) -> None:
    traffic = bandwidth.openvino_weight_traffic(_write_ir(tmp_path / "untied", tied=False))
    assert traffic.stored_bytes == INT8_TABLE + AXIS + MATMUL + OUTPUT
    # The u8 table, its zero points and its scales are all reached only through the Gather.
    assert traffic.per_token_bytes == INT8_ROW + AXIS + MATMUL + OUTPUT
    assert len(traffic.gathered) == 1


def test_weight_traffic_dispatches_and_rejects_other_paths(tmp_path: Path) -> None:
    gguf_path = _write_gguf(tmp_path / "m.gguf", tied=True)
    assert bandwidth.weight_traffic(gguf_path).format == "gguf"
    assert bandwidth.weight_traffic(_write_ir(tmp_path / "ir", tied=True)).format == "openvino"
    with pytest.raises(ValueError, match="neither"):
        bandwidth.weight_traffic(tmp_path)


def test_roofline_and_measured_sources(tmp_path: Path) -> None:
    assert bandwidth.roofline_tokens_per_s(50.0, 100_000_000) == pytest.approx(500.0)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"itl_median_ms": 20.0, "concurrency": 4}), encoding="utf-8")
    assert bandwidth.measured_tokens_per_s(str(bench))[0] == pytest.approx(50.0)
    llama = tmp_path / "llama.json"
    tests = [
        {"model_filename": "/m/a.gguf", "n_prompt": 512, "n_gen": 0, "avg_ts": 900.0},
        {"model_filename": "/m/a.gguf", "n_prompt": 0, "n_gen": 64, "avg_ts": 41.5},
        {"model_filename": "/m/b.gguf", "n_prompt": 0, "n_gen": 64, "avg_ts": 66.0},
    ]
    llama.write_text(json.dumps(tests), encoding="utf-8")
    assert bandwidth.measured_tokens_per_s(str(llama), "b") == (66.0, "llama-bench tg64")
    assert bandwidth.measured_tokens_per_s(str(llama)) == (41.5, "llama-bench tg64")
    assert bandwidth.measured_tokens_per_s("12.5") == (12.5, "given")


def test_cli_reports_percent_of_roofline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _write_gguf(tmp_path / "tiny.gguf", tied=True)
    out = tmp_path / "report.json"
    per_token = Q8_EMBEDDING + ATTN_Q
    argv = [str(model), "--bandwidth", "1", "--measured", "tiny=1000", "--json", str(out)]
    assert bandwidth.main(argv) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["models"][0]["per_token_bytes"] == per_token
    assert report["measured"][0]["fraction"] == pytest.approx(1000 / (1e9 / per_token), rel=1e-3)
    assert "CPU:" in capsys.readouterr().out
    assert bandwidth.main([str(model), "--bandwidth", "1", "--measured", "other=5"]) == 2


def test_measure_bandwidth_runs_every_pass_on_every_thread() -> None:
    result = bandwidth.measure_bandwidth(threads=2, buffer_gib=0.03, passes=2)
    assert result.threads == 2 and len(result.passes_gb_s) == 2
    assert all(value > 0 for value in result.passes_gb_s)
