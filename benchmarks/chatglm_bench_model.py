"""A ~0.4B ChatGLM3-shaped random model, built to compare every engine that serves ChatGLM.

    python -m medserve.benchmarks.chatglm_bench_model --out ~/.cache/medserve/chatglm-bench

chatglm.cpp serves only the ``chatglm`` layout, and no ChatGLM checkpoint can be downloaded
here, so the engines are compared on random weights in ChatGLM3-6B's layout (fused
``query_key_value`` with multi-query groups, SwiGLU, half rotary) at a size that is memory-bound
like the real one yet builds in a minute: hidden 1536, 16 layers, 12 query heads / 2 KV groups
of 128, FFN 4096 (~390M parameters), with the tiny ChatGLM3 tokenizer of the tests
(models/tiny_chatglm.py; its 640-row vocabulary keeps the output layer out of the way).

Writes ``OUT/hf`` (the checkpoint, fp16 safetensors, as the hub stores ChatGLM3-6B), then the
user's own commands build every served folder into ``OUT/models``:

    medserve export --weight-format int4|int8|fp16                      (OpenVINO)
    medserve export --engine llama-cpp --weight-format Q4_0|Q8_0|F16     (GGUF)
    medserve export --engine chatglm-cpp --weight-format q4_0|q8_0|f16   (chatglm.cpp)

Each step is skipped when its folder is complete. Not run by CI (~1.5 GB, ~10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# ChatGLM3-6B's proportions, scaled down: 4096 -> 1536 hidden, 28 -> 16 layers, 32 -> 12 heads.
SHAPE = {"HIDDEN": 1536, "HEADS": 12, "KV_HEADS": 2, "HEAD_DIM": 128, "FFN": 4096, "LAYERS": 16}
EXPORTS = (
    ("openvino", "int4"),
    ("openvino", "int8"),
    ("openvino", "fp16"),
    ("llama-cpp", "Q4_0"),
    ("llama-cpp", "Q8_0"),
    ("llama-cpp", "F16"),
    ("chatglm-cpp", "q4_0"),
    ("chatglm-cpp", "q8_0"),
    ("chatglm-cpp", "f16"),
)


def build_checkpoint(hf_dir: Path) -> Path:
    """The tiny ChatGLM3 builder at the benchmark's shape (its sizes are module constants)."""
    from medserve.models import tiny_chatglm

    for name, value in SHAPE.items():
        setattr(tiny_chatglm, name, value)
    return tiny_chatglm.build_tiny_checkpoint("tiny-chatglm3", hf_dir, seed=7)


def model_name(engine: str, weight_format: str) -> str:
    return f"chatglm3-0.4b-{engine}-{weight_format.lower()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medserve.benchmarks.chatglm_bench_model")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache/medserve/chatglm-bench")
    args = parser.parse_args(argv)
    hf_dir, models_dir = args.out / "hf", args.out / "models"
    if not (hf_dir / "model.safetensors.index.json").is_file():
        print(f"building the checkpoint in {hf_dir}", flush=True)
        build_checkpoint(hf_dir)
    for engine, weight_format in EXPORTS:
        name = model_name(engine, weight_format)
        if (models_dir / name / "medserve.json").is_file():
            print(f"{name}: already built", flush=True)
            continue
        print(f"{name}: exporting", flush=True)
        command = [sys.executable, "-m", "medserve.server.cli", "export", "--engine", engine]
        command += ["--hf-dir", str(hf_dir), "--weight-format", weight_format, "--name", name]
        subprocess.run([*command, "--models-dir", str(models_dir), "--quiet"], check=True)
    print(f"models ready in {models_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
