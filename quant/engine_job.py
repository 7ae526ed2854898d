"""What `medserve quantize` hands to the job it runs inside an engine's virtual environment.

The command (quant/quantize.py) runs in the server's environment and imports no engine; each
engine's job module (quant/ipex_llm_job.py, quant/ipex_job.py) runs with that engine's
interpreter, reads a Job from a JSON file, writes the model files into ``out_dir`` (a staging
folder the command owns) and answers a Result. The manifest is the command's to write.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
from medserve.quant.transformers4 import FolderCompatError


class Job(msgspec.Struct, frozen=True, kw_only=True):
    hf_dir: str
    out_dir: str
    precision: str
    """ipex-llm low-bit format (sym_int4, ...) or IPEX dtype (bf16, fp32)."""
    reference: str | None = None
    reference_kind: str | None = None
    """"ipex-llm" (a low-bit folder) or "hf" (an unquantized HF folder, run in plain torch)."""


class Result(msgspec.Struct, frozen=True, kw_only=True):
    perplexity: float
    reference_perplexity: float | None
    architecture: str
    versions: dict[str, str]


def say(text: str) -> None:
    print(f"[medserve quantize] {text}", file=sys.stderr, flush=True)


def tokenizer_samples() -> tuple[str, ...]:
    """Spaces, tabs, digits, accents, CJK, emoji: the texts `medserve export` checks too."""
    from medserve.quant.convert import ROUND_TRIP_SAMPLES

    return ROUND_TRIP_SAMPLES


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in names}


def main(run: Callable[[Job], Result], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medserve.quant.<engine>_job")
    parser.add_argument("--job", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    job = msgspec.json.decode(args.job.read_bytes(), type=Job)
    try:
        result = run(job)
    except (FolderCompatError, ValueError) as exc:
        # Expected refusals (an architecture transformers 4.47 lacks, a bad tokenizer): one
        # line for the user, not a traceback.
        print(f"medserve quantize: {exc}", file=sys.stderr)
        return 2
    args.result.write_bytes(msgspec.json.encode(result))
    return 0
