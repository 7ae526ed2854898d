"""`medserve export --engine llama-cpp`: a local Hugging Face folder -> a GGUF model folder.

    medserve export --engine llama-cpp --hf-dir DIR --name NAME --weight-format Q4_K_M

The path of one export, top to bottom:

1. stage: a data-only copy of the folder (quant/gguf_staging.py: no ``*.py``, no ``auto_map``);
   a ``chatglm`` checkpoint (ChatGLM2/3, GLM-4-9B-chat) is first rewritten into the
   transformers-native ``glm`` layout by models/chatglm_convert.py, as for OpenVINO;
2. convert: llama.cpp's ``convert_hf_to_gguf.py`` (from the same llama-cpp-python sdist as the
   engine, installer/llama_cpp_convert.sh) in a subprocess of this environment, through
   quant/gguf_convert_job.py, to F16/F32 (or BF16/F16 as the input of a quantization);
3. quantize (Q8_0, Q4_0, Q4_K_M): ``llama_model_quantize`` in the llama-cpp environment
   (quant/gguf_quantize_job.py);
4. ``model.gguf`` and ``medserve.json`` (written last) in a staging folder renamed into place,
   so a failed or killed export leaves ``models_dir/NAME`` as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from medserve.accel.registry import EngineNotInstalled, engine_entry, main_venv, worker_python
from medserve.models.layouts import Layout, LayoutError, detect_layout, read_config
from medserve.models.manifest import ModelManifest, write_manifest
from medserve.quant.convert import _NAME_PATTERN, _context_length
from medserve.quant.export import ExportError, staged_dir
from medserve.quant.gguf_register import ENGINE, FORMAT, MODEL_FILE
from medserve.quant.gguf_staging import StagingError, stage_hf_folder
from medserve.quant.quantize import _weight_hashes

GGUF_FORMATS = ("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M")
QUANTIZED_FORMATS = ("Q8_0", "Q4_0", "Q4_K_M")
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
# Environment of both subprocesses: local files only, and no stale remote-code module cache.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
_TAIL_LINES = 40


def converter_dir() -> Path:
    """Where installer/llama_cpp_convert.sh puts the converter: inside the llama-cpp venv."""
    venv = main_venv().parent / str(engine_entry(ENGINE).venv)
    return venv / "share" / "medserve" / "llama.cpp-convert"


def export_gguf(
    hf_dir: Path, models_dir: Path, name: str, weight_format: str, *, progress: bool = True
) -> Path:
    """Export ``hf_dir`` to ``models_dir/name/model.gguf`` at ``weight_format``; return it."""
    hf_dir, models_dir = Path(hf_dir).expanduser(), Path(models_dir).expanduser()
    config, layout = _check_arguments(hf_dir, name, weight_format)
    converter = _converter()
    quantizer = _llama_python() if weight_format in QUANTIZED_FORMATS else None
    final_dir = models_dir / name
    with (
        staged_dir(final_dir) as stage,
        tempfile.TemporaryDirectory(prefix=f"{stage.name}.src-", dir=stage.parent) as scratch,
    ):
        source = _stage_source(hf_dir, layout, Path(scratch), progress)
        outtype = _converter_outtype(weight_format, config)
        converted = stage / MODEL_FILE if quantizer is None else Path(scratch) / f"{outtype}.gguf"
        _say(progress, f"converting {hf_dir.name} to GGUF {outtype} with llama.cpp's converter")
        _convert(converter, source, converted, outtype, name, hf_dir, progress)
        if quantizer is not None:
            _say(progress, f"quantizing to {weight_format} with libllama ({quantizer})")
            _quantize(quantizer, converted, stage / MODEL_FILE, weight_format, progress)
            converted.unlink()
        gguf_architecture = _gguf_architecture(stage / MODEL_FILE)
        _say(progress, f"{MODEL_FILE} ready ({gguf_architecture}); hashing the source weights")
        manifest = ModelManifest(
            name=name,
            precision=weight_format.lower(),
            architecture=str(config["model_type"]),
            context_length=_context_length(config, hf_dir),
            engine=ENGINE,
            format=FORMAT,
            source={
                "hf_dir": str(hf_dir.resolve()),
                "sha256": _weight_hashes(hf_dir),
                "layout": layout.model_type,
                "family": layout.family,
                "exported_as": layout.export_model_type,
                "weight_format": weight_format,
                "gguf_architecture": gguf_architecture,
                "converter": "medserve.quant.gguf_export",
                "versions": _converter_versions(converter),
            },
        )
        write_manifest(stage, manifest)
    return final_dir


def _check_arguments(hf_dir: Path, name: str, weight_format: str) -> tuple[dict[str, Any], Layout]:
    """Everything checkable before the conversion; returns the HF config and its layout."""
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"name={name!r}: use letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit (it becomes a folder name and the served model name)"
        )
    if weight_format not in GGUF_FORMATS:
        raise ValueError(f"weight_format={weight_format!r}: use one of {', '.join(GGUF_FORMATS)}")
    try:
        config = read_config(hf_dir)
        layout = detect_layout(hf_dir)
    except LayoutError as exc:
        raise ExportError(str(exc)) from exc
    _context_length(config, hf_dir)
    return config, layout


def _converter() -> Path:
    folder = converter_dir()
    if not (folder / CONVERTER_SCRIPT).is_file() or not (folder / "gguf-py").is_dir():
        raise ExportError(
            f"llama.cpp's GGUF converter is not installed ({folder / CONVERTER_SCRIPT} is "
            f"missing); install the llama-cpp engine with `bash installer/setup.sh --with "
            f"llama-cpp`"
        )
    return folder


def _llama_python() -> Path:
    try:
        return worker_python(ENGINE)
    except EngineNotInstalled as exc:
        raise ExportError(f"quantizing a GGUF needs libllama: {exc}") from None


def _stage_source(hf_dir: Path, layout: Layout, scratch: Path, progress: bool) -> Path:
    """The data-only folder the converter reads (``scratch/hf``), after any chatglm rewrite."""
    source = hf_dir
    if layout.convert_chatglm:
        from medserve.models.chatglm_convert import convert_chatglm_checkpoint

        _say(progress, f"{layout.family}: converting the chatglm checkpoint to the glm layout")
        try:
            source = convert_chatglm_checkpoint(
                hf_dir, scratch / "glm", progress=lambda text: _say(progress, text)
            )
        except (ValueError, OSError) as exc:  # layout and tokenizer errors are ValueErrors
            raise ExportError(f"cannot convert the chatglm checkpoint {hf_dir}: {exc}") from exc
    _say(progress, f"staging a data-only copy of {source} (no *.py, no auto_map)")
    try:
        staged = stage_hf_folder(source, scratch / "hf")
    except (StagingError, OSError) as exc:
        raise ExportError(f"cannot stage {source} for conversion: {exc}") from exc
    if staged.skipped:
        _say(progress, f"left out: {', '.join(staged.skipped)}")
    if layout.convert_chatglm and layout.family == "ChatGLM2/3-6B":
        # gguf_convert_job writes a SentencePiece vocabulary (scores, piece types) from it.
        (staged.path / "tokenizer.model").write_bytes((hf_dir / "tokenizer.model").read_bytes())
    return staged.path


def _converter_outtype(weight_format: str, config: dict[str, Any]) -> str:
    if weight_format in ("F16", "F32"):
        return weight_format.lower()
    # The quantizer's input: bf16 weights stay bf16 (f16 would clip their range).
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    return "bf16" if dtype == "bfloat16" else "f16"


def _convert(
    converter: Path,
    source: Path,
    out_file: Path,
    outtype: str,
    name: str,
    hf_dir: Path,
    progress: bool,
) -> None:
    env = {
        **os.environ,
        **_OFFLINE,
        "PYTHONPATH": str(converter / "gguf-py"),
        # A fresh module cache: no remote code some earlier run left there can be found.
        "HF_MODULES_CACHE": str(source.parent / "hf-modules"),
    }
    command = [
        sys.executable,
        "-m",
        "medserve.quant.gguf_convert_job",
        "--converter",
        str(converter),
        "--",
        str(source),
        "--outtype",
        outtype,
        "--outfile",
        str(out_file),
        "--model-name",  # general.name: the served name, not the staging folder's
        name,
    ]
    code, tail = _run(command, env, progress)
    if code != 0 or not out_file.is_file():
        raise ExportError(
            f"llama.cpp's converter cannot convert {hf_dir}: {_reason(tail)} (exit code {code})"
            + ("" if progress else "\n" + "".join(tail))
        )


def _quantize(python: Path, src: Path, dest: Path, weight_format: str, progress: bool) -> None:
    command = [
        str(python),
        "-m",
        "medserve.quant.gguf_quantize_job",
        "--input",
        str(src),
        "--output",
        str(dest),
        "--format",
        weight_format,
    ]
    code, tail = _run(command, {**os.environ, **_OFFLINE}, progress)
    if code != 0 or not dest.is_file():
        raise ExportError(
            f"{weight_format} quantization of {src.name} failed: {_reason(tail)} "
            f"(exit code {code})" + ("" if progress else "\n" + "".join(tail))
        )


def _run(command: list[str], env: dict[str, str], progress: bool) -> tuple[int, list[str]]:
    """Run ``command``, echoing its output when ``progress``; returns its code and last lines."""
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    with subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None  # for the type checker: stdout=PIPE
        for line in process.stdout:
            tail.append(line)
            if progress:
                sys.stderr.write(line)
                sys.stderr.flush()
    return process.returncode, list(tail)


def _reason(tail: list[str]) -> str:
    """The converter's own words: its 'not supported' line, or the last error it printed."""
    lines = [line.strip() for line in tail if line.strip()]
    for line in reversed(lines):
        if line.startswith("ModuleNotFoundError: No module named"):
            package = line.rsplit(" ", 1)[-1].strip("'\"")
            return (
                f"it needs the Python package {package}, which this environment ({sys.prefix}) "
                f"lacks"
            )
    for line in reversed(lines):
        if "is not supported" in line or "not recognized" in line:
            return line
    for line in reversed(lines):
        if "Error" in line or line.startswith("medserve export:"):
            return line
    return lines[-1] if lines else "no output"


def _gguf_architecture(path: Path) -> str:
    """``general.architecture`` of the written file: proof it is a readable GGUF."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return str(field.contents())
    except (KeyError, ValueError, OSError) as exc:
        raise ExportError(f"{path} is not a readable GGUF file: {exc}") from exc


def _converter_versions(converter: Path) -> dict[str, str]:
    try:
        data = json.loads((converter / "medserve-convert.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {"llama-cpp-python (converter)": str(data.get("llama_cpp_python", "unknown"))}


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[medserve export] {text}", file=sys.stderr, flush=True)
