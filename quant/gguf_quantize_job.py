"""Quantize an F16/BF16/F32 GGUF with libllama, inside the llama-cpp environment.

    .venv-llama-cpp/bin/python -m medserve.quant.gguf_quantize_job --input IN --output OUT \
        --format Q4_K_M

Run by quant/gguf_export.py: the server's environment has no libllama, and the quantizer must
be the build that serves the file (.venv-llama-cpp, compiled for this CPU). Imports nothing
from medserve, so it also runs as a plain script.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

# medserve's names -> llama.cpp's llama_ftype (include/llama.h).
FTYPES = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}


def quantize(src: Path, dest: Path, weight_format: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[weight_format])
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(
        str(src).encode(), str(dest).encode(), ctypes.byref(params)
    )
    if code != 0 or not dest.is_file():
        raise RuntimeError(f"llama_model_quantize({src} -> {weight_format}) returned {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medserve.quant.gguf_quantize_job")
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--format", required=True, choices=sorted(FTYPES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    try:
        quantize(args.input, args.output, args.format, args.threads)
    except (RuntimeError, OSError) as exc:
        print(f"medserve export: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
