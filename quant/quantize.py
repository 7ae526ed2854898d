"""`medserve quantize`: a local HF folder -> a servable model folder for a PyTorch engine.

    medserve quantize --engine ipex-llm --hf-dir DIR --low-bit sym_int4 --name NAME
        [--models-dir D] [--reference MODEL_DIR --max-ppl-increase 0.10]
    medserve quantize --engine ipex --hf-dir DIR --low-bit bf16 --name NAME
    medserve quantize --preview --hf-dir DIR [...]     (every candidate: quant/preview.py)

The work runs in the engine's own environment (quant/ipex_llm_job.py in .venv-ipex-llm,
quant/ipex_job.py in .venv-ipex, started with that environment's interpreter): this process
imports neither ipex-llm, IPEX nor torch (except to convert a chatglm checkpoint). The folder
is built in a staging directory and renamed into place only after every check passed, with
``medserve.json`` written last (engine, format, precision, the sha256 of each source weight
file, the measured perplexity), so a failed or killed run leaves ``models_dir/NAME`` as it was.

``--reference`` may be an ipex-llm folder (scored in the ipex-llm environment), an OpenVINO
folder (scored with the OpenVINO runtime here) or an unquantized HF / IPEX folder (scored in
plain torch in the engine's environment); all use the same texts and arithmetic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medserve.accel.registry import EngineNotInstalled, worker_python
from medserve.models.manifest import (
    ManifestError,
    ModelManifest,
    default_models_dir,
    sha256_of,
    try_read_manifest,
    write_manifest,
)
from medserve.quant.accuracy import EVAL_TEXTS, AccuracyReport
from medserve.quant.convert import _NAME_PATTERN, _context_length
from medserve.quant.export import ExportError, staged_dir

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass(frozen=True)
class Target:
    """An engine that `medserve quantize` builds folders for, and the job that does it."""

    engine: str
    format: str
    precisions: tuple[str, ...]
    job_module: str
    """Run with the engine's interpreter: ``python -m JOB --job J --result R``."""


TARGETS = {
    "ipex-llm": Target(
        "ipex-llm",
        "ipex-llm-low-bit",
        ("sym_int4", "asym_int4", "sym_int8", "bf16"),
        "medserve.quant.ipex_llm_job",
    ),
    # IPEX runs unquantized weights; its folder is the HF model cast to bf16 or fp32.
    "ipex": Target("ipex", "hf", ("bf16", "fp32"), "medserve.quant.ipex_job"),
}
LOW_BITS = TARGETS["ipex-llm"].precisions


class QuantizeError(ExportError):
    """The quantization, a check or the accuracy gate failed; nothing was installed."""


def quantize(
    hf_dir: Path,
    models_dir: Path,
    name: str,
    low_bit: str,
    *,
    engine: str = "ipex-llm",
    reference: Path | None = None,
    max_ppl_increase: float = 0.10,
    progress: bool = True,
) -> Path:
    """Build ``models_dir/name`` from ``hf_dir`` for ``engine`` at ``low_bit``; return it."""
    hf_dir, models_dir = Path(hf_dir).expanduser(), Path(models_dir).expanduser()
    target = TARGETS[engine]
    config = _check_arguments(hf_dir, name, low_bit, target, max_ppl_increase)
    python = _engine_python(target.engine)
    reference_kind = _reference_kind(Path(reference)) if reference is not None else None
    final_dir = models_dir / name
    with staged_dir(final_dir) as stage, _transformers_native(hf_dir, config, progress) as source:
        result = _run_job(
            python,
            target,
            {
                "hf_dir": str(source.resolve()),
                "out_dir": str(stage),
                "precision": low_bit,
                "reference": str(Path(reference).resolve()) if reference else None,
                "reference_kind": reference_kind if reference_kind != "openvino" else None,
            },
            progress,
        )
        reference_ppl = result.get("reference_perplexity")
        if reference_kind == "openvino":
            from medserve.quant.accuracy import perplexity

            _say(progress, f"perplexity of the OpenVINO reference {reference} ...")
            reference_ppl = perplexity(Path(reference), EVAL_TEXTS)  # type: ignore[arg-type]
        accuracy = _accuracy(result["perplexity"], reference_ppl, reference, max_ppl_increase)
        if reference is not None:
            report = _report(accuracy, max_ppl_increase)
            _say(progress, f"accuracy gate: {report.describe()}")
            if not report.passed:
                raise QuantizeError(
                    f"{low_bit} quantization of {hf_dir} failed the accuracy gate: "
                    f"{report.describe()} against {reference}. {final_dir} was left as it was. "
                    f"Use a wider format (sym_int8 or bf16), or raise --max-ppl-increase if "
                    f"this loss is acceptable for the use."
                )
        _say(progress, f"perplexity {accuracy['perplexity']:.3f}; hashing the source weights ...")
        manifest = ModelManifest(
            name=name,
            precision=low_bit,
            architecture=str(config["model_type"]),
            context_length=_context_length(config, hf_dir),
            engine=target.engine,
            format=target.format,
            source={
                "hf_dir": str(hf_dir.resolve()),
                "sha256": _weight_hashes(hf_dir),
                "low_bit": low_bit,
                "exported_as": str(result.get("architecture") or config["model_type"]),
                "converter": "medserve.quant.quantize",
                "versions": result.get("versions", {}),
            },
            accuracy=accuracy,
        )
        write_manifest(stage, manifest)
    return final_dir


def _check_arguments(
    hf_dir: Path, name: str, low_bit: str, target: Target, max_ppl_increase: float
) -> dict[str, Any]:
    """Everything checkable before the minutes-long job; returns the HF config."""
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"name={name!r}: use letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit (it becomes a folder name and the served model name)"
        )
    if low_bit not in target.precisions:
        raise ValueError(
            f"--low-bit {low_bit}: engine {target.engine} builds {', '.join(target.precisions)}"
        )
    if not math.isfinite(max_ppl_increase):
        raise ValueError(f"max_ppl_increase={max_ppl_increase}: use a finite number")
    try:
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QuantizeError(f"{hf_dir} is not a Hugging Face model folder: {exc}") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise QuantizeError(f"{hf_dir / 'config.json'} has no model_type")
    if not _weight_files(hf_dir):
        raise QuantizeError(f"{hf_dir} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    _context_length(config, hf_dir)
    return config


@contextmanager
def _transformers_native(hf_dir: Path, config: dict[str, Any], progress: bool) -> Iterator[Path]:
    """``hf_dir`` itself, or for a ``chatglm`` checkpoint its ``glm`` form in a scratch folder.

    The chatglm layout runs only through modeling_chatglm.py, code shipped with the weights
    that is never executed here; models/chatglm_convert.py rewrites it, exactly, into
    transformers' own GlmForCausalLM layout, which ipex-llm 2.2 optimizes.
    """
    if config["model_type"] != "chatglm":
        yield hf_dir
        return
    from medserve.models.chatglm_convert import convert_chatglm_checkpoint
    from medserve.models.layouts import LayoutError

    with tempfile.TemporaryDirectory(prefix="medserve-glm-") as scratch:
        _say(progress, f"{hf_dir} is a chatglm checkpoint: converting it to the glm layout ...")
        try:
            yield convert_chatglm_checkpoint(
                hf_dir, Path(scratch) / "glm", progress=lambda text: _say(progress, text)
            )
        except LayoutError as exc:
            raise QuantizeError(str(exc)) from exc


def _engine_python(engine: str) -> Path:
    try:
        return worker_python(engine)
    except EngineNotInstalled as exc:
        raise QuantizeError(str(exc)) from None


def _reference_kind(reference: Path) -> str:
    """What the reference folder is, hence where its perplexity is computed."""
    manifest = try_read_manifest(reference)
    if manifest is not None:
        if manifest.format == TARGETS["ipex-llm"].format:
            return "ipex-llm"
        if manifest.format == "openvino-ir":
            return "openvino"
        if manifest.format == "hf":
            return "hf"  # an IPEX folder is a plain HF folder
        raise QuantizeError(f"reference {reference}: cannot score format {manifest.format!r}")
    if (reference / "config.json").is_file() and _weight_files(reference):
        return "hf"
    raise QuantizeError(
        f"reference {reference} is neither a model folder (medserve.json) nor a Hugging Face "
        f"folder (config.json and weights)"
    )


def _run_job(python: Path, target: Target, job: dict[str, Any], progress: bool) -> dict[str, Any]:
    env = dict(os.environ)
    # Local folders only: never let a typo turn into a model-hub download.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.TemporaryDirectory(prefix="medserve-quantize-") as scratch:
        job_path, result_path = Path(scratch, "job.json"), Path(scratch, "result.json")
        job_path.write_text(json.dumps(job), encoding="utf-8")
        command = [
            str(python),
            "-m",
            target.job_module,
            "--job",
            str(job_path),
            "--result",
            str(result_path),
        ]
        completed = subprocess.run(
            command,
            env=env,
            stdout=None if progress else subprocess.PIPE,
            stderr=None if progress else subprocess.STDOUT,
            text=True,
            check=False,
        )
        if completed.returncode != 0 or not result_path.is_file():
            tail = "\n".join((completed.stdout or "").splitlines()[-30:])
            raise QuantizeError(
                f"{target.engine} build of {job['hf_dir']} ({job['precision']}) failed with exit "
                f"code {completed.returncode}\n{tail}"
            )
        return json.loads(result_path.read_text(encoding="utf-8"))


def _accuracy(
    candidate: float, reference_ppl: float | None, reference: Path | None, max_increase: float
) -> dict[str, Any]:
    accuracy: dict[str, Any] = {"perplexity": candidate, "eval_texts": len(EVAL_TEXTS)}
    if reference is not None and reference_ppl is not None:
        if not math.isfinite(reference_ppl):
            raise QuantizeError(f"reference {reference} has perplexity {reference_ppl}")
        accuracy.update(
            reference_perplexity=reference_ppl,
            relative_increase=candidate / reference_ppl - 1.0,
            max_relative_increase=max_increase,
            reference=str(Path(reference).resolve()),
        )
    return accuracy


def _report(accuracy: dict[str, Any], max_increase: float) -> AccuracyReport:
    increase = float(accuracy["relative_increase"])
    # A NaN from a broken model compares False everywhere; check it explicitly all the same.
    passed = math.isfinite(accuracy["perplexity"]) and increase <= max_increase
    return AccuracyReport(
        accuracy["perplexity"], accuracy["reference_perplexity"], increase, passed, max_increase
    )


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _weight_hashes(folder: Path) -> dict[str, str]:
    return {path.name: sha256_of(path) for path in _weight_files(folder)}


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[medserve quantize] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--preview" in argv:
        # Every candidate instead of one build: its own options (quant/preview.py).
        from medserve.quant.preview import main as preview_main

        return preview_main([arg for arg in argv if arg != "--preview"])
    parser = argparse.ArgumentParser(
        prog="medserve quantize",
        description="Quantize a local Hugging Face model folder into a servable low-bit folder.",
        epilog="`medserve quantize --preview -h`: build every candidate, measure and judge each.",
    )
    parser.add_argument("--engine", required=True, choices=sorted(TARGETS), help="serving engine")
    parser.add_argument("--hf-dir", type=Path, required=True, help="local HF model folder")
    parser.add_argument(
        "--low-bit",
        required=True,
        choices=sorted({p for t in TARGETS.values() for p in t.precisions}),
        help="ipex-llm: sym_int4, asym_int4, sym_int8, bf16; ipex: bf16, fp32",
    )
    parser.add_argument("--name", required=True, help="model name (folder under --models-dir)")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="where models are served from (default $MEDSERVE_HOME/models or ~/.medserve/models)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="model folder (ipex-llm or OpenVINO) or unquantized HF folder to gate accuracy on",
    )
    parser.add_argument(
        "--max-ppl-increase",
        type=float,
        default=0.10,
        help="allowed relative perplexity increase over --reference (default 0.10 = 10%%)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        out = quantize(
            args.hf_dir,
            args.models_dir or default_models_dir(),
            args.name,
            args.low_bit,
            engine=args.engine,
            reference=args.reference,
            max_ppl_increase=args.max_ppl_increase,
            progress=not args.quiet,
        )
    except (ExportError, ManifestError, ValueError) as exc:
        print(f"medserve quantize: {exc}", file=sys.stderr)
        return 1
    print(f"medserve quantize: {args.name} ready in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
