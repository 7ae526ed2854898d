"""Build the ~0.8B benchmark model and export it for OpenVINO and for llama.cpp.

    python -m medserve.benchmarks.bench_model --out ~/.cache/medserve/bench-model

Why: the bundled SmolLM2-135M is so small that per-step overheads (Python, HTTP, scheduling)
hide the engine; a model of ~0.8B parameters is memory-bound like the 6-9B models a hospital
serves, yet still exports in minutes on 2 cores. No such model can be downloaded here, so this
one has random weights (seeded, normal with std 0.02 like a fresh Llama: outputs are finite
but meaningless) in a Llama shape: hidden 2048, 16 layers, 32 query / 8 KV heads (GQA),
intermediate 5632, tied embeddings, SmolLM2's 49152-token tokenizer, 822M parameters.

Layout under --out (each step is skipped when its output is already complete):

    hf/                              HF folder, float32 safetensors, SmolLM2 tokenizer
    openvino/bench-0.8b-fp16/        `medserve export --weight-format fp16`
    openvino/bench-0.8b-int8/        `medserve export --weight-format int8` (per-channel asym)
    openvino/bench-0.8b-int4-sym-g32/  optimum-cli int4 --sym --group-size 32 (see below)
    gguf/bench-0.8b-F16.gguf         convert_hf_to_gguf.py from the llama.cpp tree
    gguf/bench-0.8b-Q8_0.gguf        llama-quantize
    gguf/bench-0.8b-Q4_0.gguf        llama-quantize (symmetric, groups of 32)

int4 is symmetric with groups of 32 so that it stores what llama.cpp's Q4_0 stores (one scale
per 32 weights, no zero point). `medserve export` has no --sym option (its int4 is asymmetric),
so that one folder is exported with the same optimum-cli command plus --sym. `openvino/` is a
models folder: `MEDSERVE_ENGINE_MODELS_DIR=<out>/openvino MEDSERVE_ENGINE_MODEL=bench-0.8b-int8
medserve serve` serves one. The GGUF steps need the llama.cpp build of
benchmarks/llama_cpp/build.sh; convert_hf_to_gguf.py imports sentencepiece for any Llama, so
sentencepiece is pip-installed into a folder beside that build, not into the main venv.
Not run by CI: it writes ~9 GB and takes 15-30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medserve.quant.convert import convert_hf_model
from medserve.quant.export import WeightFormat, is_valid_model_dir, staged_dir, write_manifest

NAME = "bench-0.8b"
GENERATOR = "medserve.benchmarks.bench_model"  # __name__ is "__main__" under python -m
SHAPE = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 5632,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
HF_MARKER = ".bench-model.json"
GGUF_QUANTS = ("Q8_0", "Q4_0")
INT4_GROUP = 32
SENTENCEPIECE = "sentencepiece==0.2.1"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def say(text: str) -> None:
    print(f"[bench-model] {text}", flush=True)


def llama_cpp_dir() -> Path:
    """Where benchmarks/llama_cpp/build.sh puts the llama.cpp tree and build."""
    default = Path.home() / ".cache/medserve/llama.cpp"
    return Path(os.environ.get("MEDSERVE_LLAMA_CPP_DIR", default)).expanduser()


def build_hf_model(hf_dir: Path, tokenizer_dir: Path, seed: int) -> Path:
    """Random-weight Llama of SHAPE with the SmolLM2 tokenizer, saved as an HF folder."""
    marker = hf_dir / HF_MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("seed") == seed:
        say(f"HF folder already built: {hf_dir}")
        return hf_dir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    source = json.loads((tokenizer_dir / "config.json").read_text(encoding="utf-8"))
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "rms_norm_eps", "rope_parameters")
    config = LlamaConfig(**{k: source[k] for k in keep if k in source}, **SHAPE)
    started = time.monotonic()
    say(f"building the random-weight model (seed {seed}) ...")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())  # shared tensors are listed once
    with torch.no_grad():
        logits = model(torch.tensor([[1, 100, 200, 300]])).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("the random model produces non-finite logits; lower the std")
    with staged_dir(hf_dir) as stage:
        model.save_pretrained(stage)
        for name in TOKENIZER_FILES:
            shutil.copy2(tokenizer_dir / name, stage / name)
        (stage / HF_MARKER).write_text(
            json.dumps({"seed": seed, "parameters": params, "shape": SHAPE}) + "\n",
            encoding="utf-8",
        )
    say(f"HF folder ready in {time.monotonic() - started:.0f} s: {params / 1e6:.1f}M parameters")
    return hf_dir


def export_openvino_variants(hf_dir: Path, models_dir: Path) -> list[Path]:
    """fp16 and int8 through `medserve export`, int4 sym g32 through optimum-cli --sym."""
    outputs = []
    formats: tuple[WeightFormat, ...] = ("fp16", "int8")
    for fmt in formats:
        target = models_dir / f"{NAME}-{fmt}"
        if is_valid_model_dir(target):
            say(f"OpenVINO {fmt} already exported: {target}")
        else:
            say(f"medserve export {fmt} (a few minutes) ...")
            started = time.monotonic()
            convert_hf_model(hf_dir, models_dir, target.name, fmt, progress=False)
            say(f"OpenVINO {fmt} ready in {time.monotonic() - started:.0f} s: {target}")
        outputs.append(target)
    target = models_dir / f"{NAME}-int4-sym-g{INT4_GROUP}"
    if is_valid_model_dir(target):
        say(f"OpenVINO int4 already exported: {target}")
    else:
        say(f"optimum-cli export int4 --sym --group-size {INT4_GROUP} (a few minutes) ...")
        started = time.monotonic()
        with staged_dir(target) as stage:
            # The command quant/export.py builds for int4, plus --sym; ratio 1.0 puts every
            # linear layer in int4 (the tied embedding/lm_head stays int8, NNCF's default).
            command = [
                *(sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino"),
                *("--model", str(hf_dir), "--task", "text-generation-with-past"),
                *("--weight-format", "int4", "--sym", "--group-size", str(INT4_GROUP)),
                *("--ratio", "1.0", str(stage)),
            ]
            _run(command, env={"PYTHONWARNINGS": "ignore"})
            write_manifest(stage, _manifest(target.name, "int4", hf_dir, command[5:-1]))
        say(f"OpenVINO int4 ready in {time.monotonic() - started:.0f} s: {target}")
    outputs.append(target)
    return outputs


def export_gguf_variants(hf_dir: Path, gguf_dir: Path, llama_cpp: Path) -> list[Path]:
    """GGUF F16 with convert_hf_to_gguf.py, then Q8_0 / Q4_0 with llama-quantize."""
    tree, quantize = llama_cpp / "src", llama_cpp / "build/bin/llama-quantize"
    if not (tree / "convert_hf_to_gguf.py").is_file() or not quantize.is_file():
        raise RuntimeError(f"no llama.cpp build in {llama_cpp}: run benchmarks/llama_cpp/build.sh")
    gguf_dir.mkdir(parents=True, exist_ok=True)
    f16 = gguf_dir / f"{NAME}-F16.gguf"
    if f16.is_file():
        say(f"GGUF F16 already converted: {f16}")
    else:
        pydeps = _sentencepiece_dir(llama_cpp)
        say("convert_hf_to_gguf.py --outtype f16 ...")
        partial = f16.with_suffix(".gguf.partial")
        command = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir)]
        command += ["--outtype", "f16", "--outfile", str(partial)]
        _run(command, env={"PYTHONPATH": f"{tree / 'gguf-py'}{os.pathsep}{pydeps}"}, quiet=True)
        partial.replace(f16)
        say(f"GGUF F16 ready: {f16}")
    outputs = [f16]
    for quant in GGUF_QUANTS:
        target = gguf_dir / f"{NAME}-{quant}.gguf"
        if target.is_file():
            say(f"GGUF {quant} already quantized: {target}")
        else:
            say(f"llama-quantize {quant} ...")
            partial = target.with_suffix(".gguf.partial")
            _run([str(quantize), str(f16), str(partial), quant, "2"], quiet=True)
            partial.replace(target)
            say(f"GGUF {quant} ready: {target}")
        outputs.append(target)
    return outputs


def _sentencepiece_dir(llama_cpp: Path) -> Path:
    """A folder holding only sentencepiece, put on PYTHONPATH for the converter alone."""
    target = llama_cpp / "pydeps"
    if not (target / "sentencepiece").is_dir():
        say(f"pip install {SENTENCEPIECE} into {target} (for convert_hf_to_gguf.py only)")
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
        _run([*pip, str(target), SENTENCEPIECE])
    return target


def _manifest(name: str, precision: str, hf_dir: Path, extra: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "architecture": "llama",
        "precision": precision,
        "context_length": SHAPE["max_position_embeddings"],
        "source": {"hf_dir": str(hf_dir.resolve()), "generator": GENERATOR, "options": extra},
    }


def _run(command: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> None:
    full_env = {**os.environ, **OFFLINE, **(env or {})}
    result = subprocess.run(command, env=full_env, capture_output=quiet, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or "").splitlines()[-20:])
        raise RuntimeError(f"failed ({result.returncode}): {' '.join(command)}\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_model", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for every output")
    parser.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=Path("~/.medserve/hf/smollm2-135m-instruct"),
        help="HF folder whose tokenizer to use (default: the bundled model's, from setup.sh)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-openvino", action="store_true")
    parser.add_argument("--skip-gguf", action="store_true", help="no llama.cpp build needed")
    args = parser.parse_args(argv)
    out = args.out.expanduser()
    started = time.monotonic()
    try:
        hf_dir = build_hf_model(out / "hf", args.tokenizer_dir.expanduser(), args.seed)
        outputs = [] if args.skip_openvino else export_openvino_variants(hf_dir, out / "openvino")
        if not args.skip_gguf:
            outputs += export_gguf_variants(hf_dir, out / "gguf", llama_cpp_dir())
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"bench_model: {exc}", file=sys.stderr)
        return 1
    say(f"done in {time.monotonic() - started:.0f} s:")
    for path in [hf_dir, *outputs]:
        say(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
