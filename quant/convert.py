"""`medserve export`: a local Hugging Face folder -> a servable, accuracy-checked model folder.

    medserve export --hf-dir DIR --name NAME --weight-format int4 [--reference MODEL_DIR]
    medserve export --engine chatglm-cpp --hf-dir DIR --name NAME --weight-format q4_0
    medserve export --engine llama-cpp --hf-dir DIR --name NAME --weight-format Q4_K_M
    medserve export --engine llama-cpp --gguf FILE.gguf --name NAME

The result is ``models_dir/NAME`` with the IRs and a ``medserve.json`` manifest. It is built in
a staging folder and renamed into place only after every check passed, so a failed or killed
export leaves ``models_dir/NAME`` as it was (absent, or the previous good build).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

from medserve.models.layouts import Layout, LayoutError, detect_layout, export_python
from medserve.models.manifest import default_models_dir
from medserve.quant.accuracy import EVAL_TEXTS, AccuracyError, compare_to_reference
from medserve.quant.export import (
    ExportError,
    WeightFormat,
    export_openvino,
    is_valid_model_dir,
    staged_dir,
    write_manifest,
)

# A plain folder name: no path separators, and no leading dot (staging folders use one).
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Spaces, newlines, tabs, digits, accents, CJK and emoji: what breaks a badly converted tokenizer.
ROUND_TRIP_SAMPLES = (
    "The capital of France is Paris.",
    "  two  spaces,\ttab,\n\nblank line and trailing space ",
    "Dose: 12.5 mg/kg, 3x daily (max 4000 mg).",
    "café naïve — 你好，世界 🙂",
    EVAL_TEXTS[0],
)
CHECK_MESSAGES = ({"role": "user", "content": "What is the capital of France?"},)
# Config keys that hold the trained context length, by architecture family.
_CONTEXT_KEYS = ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length")


class AccuracyGateError(ExportError):
    """The quantized export is worse than its reference by more than allowed."""


def convert_hf_model(
    hf_dir: Path,
    models_dir: Path,
    name: str,
    weight_format: WeightFormat,
    *,
    group_size: int | None = None,
    reference: Path | None = None,
    max_ppl_increase: float = 0.10,
    progress: bool = True,
) -> Path:
    """Export ``hf_dir`` to ``models_dir/name`` at ``weight_format``; return that folder.

    Checks, in order: the tokenizer IR encodes like the HF tokenizer and round-trips what it
    round-trips, and renders the same chat template; then, when ``reference`` (an exported
    model folder, usually the fp16 or fp32 build) is given, the perplexity on
    ``accuracy.EVAL_TEXTS`` may exceed the reference's by at most ``max_ppl_increase``
    (0.10 = 10 %). The manifest is written last.
    """
    hf_dir, models_dir = Path(hf_dir).expanduser(), Path(models_dir).expanduser()
    config = _check_arguments(hf_dir, name, weight_format, group_size, reference)
    try:
        layout = detect_layout(hf_dir)
        python = export_python(layout)
    except LayoutError as exc:
        raise ExportError(str(exc)) from exc
    final_dir = models_dir / name
    with staged_dir(final_dir) as stage, _export_source(hf_dir, layout, stage, progress) as src:
        if python != sys.executable:
            _say(progress, f"{layout.family}: exporting in the converter environment {python}")
        export_openvino(
            src, stage, weight_format, group_size=group_size, progress=progress, python=python
        )
        _check_tokenizer(stage, src)
        accuracy: dict[str, Any] | None = None
        if reference is not None:
            _say(progress, f"accuracy gate: perplexity of {name} vs {reference} ...")
            try:
                report = compare_to_reference(stage, reference, EVAL_TEXTS, max_ppl_increase)
            except AccuracyError as exc:
                raise ExportError(f"cannot measure the accuracy of {name}: {exc}") from exc
            _say(progress, f"accuracy gate: {report.describe()}")
            if not report.passed:
                raise AccuracyGateError(
                    f"{weight_format} export of {hf_dir} failed the accuracy gate: "
                    f"{report.describe()} against {reference}. {final_dir} was left as it "
                    f"was. Use a wider format (int8 or fp16), or raise "
                    f"--max-ppl-increase if this loss is acceptable for the use."
                )
            accuracy = {
                "perplexity": report.candidate_ppl,
                "reference_perplexity": report.reference_ppl,
                "relative_increase": report.relative_increase,
                "max_relative_increase": max_ppl_increase,
                "reference": str(Path(reference).resolve()),
                "eval_texts": len(EVAL_TEXTS),
            }
        manifest: dict[str, Any] = {
            "name": name,
            "architecture": config["model_type"],
            "precision": weight_format,
            "context_length": _context_length(config, hf_dir),
            "source": {
                "hf_dir": str(hf_dir.resolve()),
                "layout": layout.model_type,
                "family": layout.family,
                "exported_as": layout.export_model_type,
                "weight_format": weight_format,
                "group_size": group_size,
                "converter": "medserve.quant.convert",
            },
        }
        if accuracy is not None:
            manifest["accuracy"] = accuracy
        write_manifest(stage, manifest)
    return final_dir


@contextmanager
def _export_source(hf_dir: Path, layout: Layout, stage: Path, progress: bool) -> Iterator[Path]:
    """The folder optimum exports: ``hf_dir`` itself, or its ``glm`` conversion for a
    ``chatglm`` checkpoint, written beside the staging folder (same disk, which has room for
    the model) and removed afterwards."""
    if not layout.convert_chatglm:
        yield hf_dir
        return
    from medserve.models.chatglm_convert import convert_chatglm_checkpoint, default_progress

    with tempfile.TemporaryDirectory(prefix=f"{stage.name}.glm-", dir=stage.parent) as tmp:
        try:
            convert_chatglm_checkpoint(
                hf_dir, Path(tmp), progress=default_progress if progress else None
            )
        except (ValueError, OSError) as exc:  # layout and tokenizer errors are ValueErrors
            raise ExportError(f"cannot convert the chatglm checkpoint {hf_dir}: {exc}") from exc
        yield Path(tmp)


# Weight formats per engine; the OpenVINO ones are WeightFormat (quant/export.py).
GGML_WEIGHT_FORMATS = {
    "chatglm-cpp": ("q4_0", "q8_0", "f16", "f32"),
    "llama-cpp": ("Q4_0", "Q4_K_M", "Q8_0", "F16", "F32"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medserve export",
        description=(
            "Convert a local Hugging Face model folder to a servable model folder: OpenVINO "
            "IR (default), chatglm.cpp (--engine chatglm-cpp) or GGUF (--engine llama-cpp; "
            "--gguf serves an existing GGUF file as it is). GLM-family folders are taken as "
            "downloaded: chatglm (ChatGLM2/3-6B, GLM-4-9B-chat; converted first, no remote "
            "code), glm (GLM-4-9B-chat-hf) and glm4 (GLM-4-0414, GLM-Z1)."
        ),
    )
    parser.add_argument(
        "--engine",
        choices=("openvino", *GGML_WEIGHT_FORMATS),
        default="openvino",
        help="engine that will serve the folder (default openvino)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", type=Path, help="local HF model folder")
    source.add_argument("--gguf", type=Path, help="existing GGUF file (--engine llama-cpp)")
    parser.add_argument("--name", required=True, help="model name (folder under --models-dir)")
    parser.add_argument(
        "--weight-format",
        default=None,
        help=(
            f"openvino: {', '.join(get_args(WeightFormat))}; chatglm-cpp: "
            f"{', '.join(GGML_WEIGHT_FORMATS['chatglm-cpp'])}; llama-cpp: "
            f"{', '.join(GGML_WEIGHT_FORMATS['llama-cpp'])}"
        ),
    )
    parser.add_argument("--group-size", type=int, default=None, help="int4 group size (auto)")
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="exported fp16/fp32 model folder to gate accuracy against (no gate without it)",
    )
    parser.add_argument(
        "--max-ppl-increase",
        type=float,
        default=0.10,
        help="allowed relative perplexity increase over --reference (default 0.10 = 10%%)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="where models are served from (default $MEDSERVE_HOME/models or ~/.medserve/models)",
    )
    parser.add_argument("--quiet", action="store_true", help="no export progress output")
    args = parser.parse_args(argv)
    try:
        out = _export(args, parser)
    except (ExportError, ValueError) as exc:
        print(f"medserve export: {exc}", file=sys.stderr)
        return 1
    print(f"medserve export: {args.name} ready in {out}")
    return 0


def _export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    models_dir = args.models_dir or default_models_dir()
    if args.gguf is not None:
        if args.engine != "llama-cpp":
            parser.error("--gguf needs --engine llama-cpp")
        if args.weight_format is not None:
            parser.error("--gguf serves the file as it is: no --weight-format")
        _check_name(args.name)
        from medserve.quant.gguf_register import register_gguf

        return register_gguf(args.gguf, models_dir, args.name)
    if args.weight_format is None:
        parser.error("--weight-format is required with --hf-dir")
    if args.engine == "openvino":
        return convert_hf_model(
            args.hf_dir,
            models_dir,
            args.name,
            args.weight_format,
            group_size=args.group_size,
            reference=args.reference,
            max_ppl_increase=args.max_ppl_increase,
            progress=not args.quiet,
        )
    allowed = GGML_WEIGHT_FORMATS[args.engine]
    if args.weight_format not in allowed:
        parser.error(f"--engine {args.engine}: --weight-format is one of {', '.join(allowed)}")
    if args.reference is not None or args.group_size is not None:
        parser.error("--reference and --group-size apply to --engine openvino only")
    _check_name(args.name)
    if args.engine == "chatglm-cpp":
        from medserve.quant.chatglm_cpp_export import export_chatglm_cpp

        return export_chatglm_cpp(
            args.hf_dir, models_dir, args.name, args.weight_format, progress=not args.quiet
        )
    from medserve.quant.gguf_export import export_gguf

    return export_gguf(
        args.hf_dir, models_dir, args.name, args.weight_format, progress=not args.quiet
    )


def _check_name(name: str) -> None:
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"name={name!r}: use letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit (it becomes a folder name and the served model name)"
        )


def _check_arguments(
    hf_dir: Path,
    name: str,
    weight_format: str,
    group_size: int | None,
    reference: Path | None,
) -> dict[str, Any]:
    """Everything checkable before the minutes-long export; returns the HF config."""
    _check_name(name)
    if weight_format not in get_args(WeightFormat):
        raise ValueError(f"weight_format={weight_format!r}: use one of {get_args(WeightFormat)}")
    if group_size is not None and (weight_format != "int4" or group_size <= 0):
        raise ValueError(f"group_size={group_size}: only a positive size, and only with int4")
    config_path = hf_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{hf_dir} is not a Hugging Face model folder: {exc}") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise ExportError(f"{config_path} has no model_type")
    _context_length(config, hf_dir)
    if reference is not None and not is_valid_model_dir(Path(reference)):
        raise ExportError(
            f"reference {reference} is not an exported model folder (medserve.json and the "
            f"OpenVINO IRs); export the fp16 build first and pass its folder"
        )
    return config


def _context_length(config: dict[str, Any], hf_dir: Path) -> int:
    for key in _CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    keys = ", ".join(_CONTEXT_KEYS)
    raise ExportError(f"{hf_dir / 'config.json'} names no context length (none of {keys})")


def _check_tokenizer(model_dir: Path, hf_dir: Path) -> None:
    """The tokenizer IR must behave like the HF tokenizer it was converted from.

    Same ids for every sample, exact round trip for each sample the HF tokenizer itself
    round-trips (a SentencePiece tokenizer may legitimately not keep a leading space), and
    the same chat-template rendering when the model has a template.
    """
    import openvino_genai
    from transformers import AutoTokenizer

    try:
        source = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the HF tokenizer of {hf_dir} to check: {exc}") from exc
    exported = openvino_genai.Tokenizer(str(model_dir))
    for text in ROUND_TRIP_SAMPLES:
        expected = list(source.encode(text, add_special_tokens=False))
        ids = exported.encode(text, add_special_tokens=False).input_ids.data.tolist()[0]
        if ids != expected:
            raise ExportError(
                f"tokenizer IR in {model_dir} encodes {text!r} as {ids[:12]}..., the HF "
                f"tokenizer in {hf_dir} as {expected[:12]}..."
            )
        if source.decode(expected) == text and (decoded := exported.decode(ids)) != text:
            raise ExportError(
                f"tokenizer IR in {model_dir} does not round-trip {text!r}: got {decoded!r}"
            )
    if getattr(source, "chat_template", None):
        messages = [dict(m) for m in CHECK_MESSAGES]
        expected_prompt = source.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        prompt = exported.apply_chat_template(messages, add_generation_prompt=True)
        if prompt != expected_prompt:
            raise ExportError(
                f"chat template in {model_dir} renders {prompt!r}; the HF tokenizer renders "
                f"{expected_prompt!r}"
            )


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[medserve export] {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
