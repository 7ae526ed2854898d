"""The builds `medserve quantize --preview` compares, and how each is made and scored.

Every candidate is built with the command a user would run for it (``medserve export`` for
OpenVINO, llama.cpp and chatglm.cpp, ``medserve quantize`` for ipex-llm and IPEX), into a work
folder instead of the models folder, so what is previewed is exactly what would be served.
Perplexity comes from the same scorers those commands use: the OpenVINO runtime for IR folders
(quant/accuracy.py), llama.cpp itself for GGUF (quant/gguf_perplexity_job.py), and for the
PyTorch engines the figure their job measured on reload and wrote into the folder's manifest
(quant/torch_perplexity.py) — one scorer per engine, never a second one. chatglm.cpp has no
logits to score; see LOGIT_TWINS.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medserve.accel.registry import EngineNotInstalled, worker_python
from medserve.models.layouts import LayoutError, detect_layout
from medserve.models.manifest import read_manifest
from medserve.quant.accuracy import EVAL_TEXTS, perplexity
from medserve.quant.convert import convert_hf_model
from medserve.quant.export import WeightFormat
from medserve.quant.quantize import LOW_BITS, quantize


@dataclass(frozen=True)
class Candidate:
    name: str
    """Folder name in the work folder and the name in the table: ``<engine>-<precision>``."""
    engine: str
    precision: str


CANDIDATES: tuple[Candidate, ...] = (
    *(Candidate(f"openvino-{p}", "openvino", p) for p in ("int4", "int8", "fp16")),
    *(Candidate(f"ipex-llm-{p}", "ipex-llm", p) for p in LOW_BITS),
    Candidate("ipex-bf16", "ipex", "bf16"),
    *(Candidate(f"llama-cpp-{p}", "llama-cpp", p) for p in ("Q4_0", "Q4_K_M", "Q8_0", "F16")),
    *(Candidate(f"chatglm-cpp-{p}", "chatglm-cpp", p) for p in ("q4_0", "q8_0", "f16")),
)
BY_NAME = {candidate.name: candidate for candidate in CANDIDATES}
REFERENCE = BY_NAME["openvino-fp16"]
"""Built as the reference when no ``--reference`` folder is given: the unquantized weights at
the precision OpenVINO serves them, scored like every OpenVINO candidate (within 0.01 % of
the HF fp32 folder in torch on the bundled model, benchmarks/RESULTS.md)."""
QUICK_CANDIDATES = ("openvino-int8", "ipex-llm-sym_int4")
"""``--quick`` without ``--candidates``: one build per default engine."""
SOURCE_FINGERPRINT = "preview-source.json"


def parse_candidates(text: str) -> list[Candidate]:
    """``"all"``, engine names (every build of it) and candidate names, comma separated."""
    chosen: dict[str, Candidate] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == "all":
            matches = list(CANDIDATES)
        elif item in BY_NAME:
            matches = [BY_NAME[item]]
        else:
            matches = [c for c in CANDIDATES if c.engine == item]
        if not matches:
            raise ValueError(
                f"unknown candidate {item!r}; use all, an engine (openvino, ipex-llm, ipex, "
                f"llama-cpp, chatglm-cpp) or "
                f"one of {', '.join(BY_NAME)}"
            )
        chosen.update((c.name, c) for c in matches)
    if not chosen:
        raise ValueError(f"--candidates {text!r} names no candidate")
    return list(chosen.values())


LOGIT_TWINS = {"chatglm-cpp-q4_0": "llama-cpp-Q4_0", "chatglm-cpp-q8_0": "llama-cpp-Q8_0",
               "chatglm-cpp-f16": "llama-cpp-F16"}  # fmt: skip
"""chatglm.cpp exposes no logits, so its builds cannot be scored by it. Its q4_0/q8_0/f16
tensors are ggml's own block formats, the ones llama.cpp uses for Q4_0/Q8_0/F16 of the same
weights: a chatglm.cpp row takes its twin's perplexity when the twin was built (and says so)."""


def not_applicable(candidate: Candidate, hf_dir: Path) -> str | None:
    """Why ``candidate`` cannot be built from this source at all, or None."""
    if candidate.engine != "chatglm-cpp":
        return None
    try:
        model_type = detect_layout(hf_dir).model_type
    except LayoutError as exc:
        return str(exc)
    if model_type != "chatglm":
        return (
            f"chatglm.cpp serves the chatglm layout only (ChatGLM2/3, GLM-4-chat), not {model_type}"
        )
    return None


def missing_engine(engine: str) -> str | None:
    """Why ``engine`` cannot run here (its environment is not installed), or None."""
    try:
        worker_python(engine)
    except EngineNotInstalled:
        return f"{engine} not installed (`bash installer/setup.sh --with {engine}`)"
    return None


def build(candidate: Candidate, hf_dir: Path, work_dir: Path) -> Path:
    """Build ``candidate`` from ``hf_dir`` as ``work_dir/<name>`` (atomically); return it."""
    if candidate.engine == "openvino":
        weight_format: WeightFormat = candidate.precision  # type: ignore[assignment]
        return convert_hf_model(hf_dir, work_dir, candidate.name, weight_format, progress=False)
    if candidate.engine == "llama-cpp":
        from medserve.quant.gguf_export import export_gguf

        return export_gguf(hf_dir, work_dir, candidate.name, candidate.precision, progress=False)
    if candidate.engine == "chatglm-cpp":
        from medserve.quant.chatglm_cpp_export import export_chatglm_cpp

        return export_chatglm_cpp(
            hf_dir, work_dir, candidate.name, candidate.precision, progress=False
        )
    return quantize(
        hf_dir,
        work_dir,
        candidate.name,
        candidate.precision,
        engine=candidate.engine,
        progress=False,
    )


def candidate_perplexity(candidate: Candidate, folder: Path) -> float:
    """Perplexity on ``accuracy.EVAL_TEXTS``, by the scorer of the candidate's engine."""
    if candidate.engine == "openvino":
        return perplexity(folder, EVAL_TEXTS)
    if candidate.engine == "llama-cpp":
        return _gguf_perplexity(folder)
    if candidate.engine == "chatglm-cpp":
        return math.nan  # no logits: see LOGIT_TWINS
    accuracy = read_manifest(folder).accuracy or {}
    return float(accuracy["perplexity"])  # measured by the engine's job on reload


def _gguf_perplexity(folder: Path) -> float:
    """Scored by llama.cpp itself, in its environment (quant/gguf_perplexity_job.py)."""
    result = subprocess.run(
        [str(worker_python("llama-cpp")), "-m", "medserve.quant.gguf_perplexity_job", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ValueError(f"llama.cpp perplexity failed: {result.stderr.strip()[-500:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["perplexity"])


def folder_bytes(folder: Path) -> int:
    """Size on disk of everything the folder holds (what installing it costs)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def source_fingerprint(hf_dir: Path) -> dict[str, Any]:
    """Names, sizes and modification times of the source's files: cheap to take on a 20 GB
    model (no hashing), and any re-download or edit changes it."""
    files = sorted(p for p in hf_dir.iterdir() if p.is_file())
    return {
        "hf_dir": str(hf_dir.resolve()),
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def prepare_work_dir(work_dir: Path, hf_dir: Path) -> list[str]:
    """Make ``work_dir`` hold builds of ``hf_dir`` only; return the finished builds it has.

    A kept work folder lets a second preview (other thresholds, a quieter machine) skip the
    builds. Builds of another source, or of a changed one, are removed first: only folders
    named after a candidate, nothing else in ``work_dir`` is touched.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = source_fingerprint(hf_dir)
    path = work_dir / SOURCE_FINGERPRINT
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if previous != fingerprint:
        for name in BY_NAME:
            shutil.rmtree(work_dir / name, ignore_errors=True)
        path.write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
    return [name for name in BY_NAME if (work_dir / name / "medserve.json").is_file()]
