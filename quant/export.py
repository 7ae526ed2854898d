"""Hugging Face folder -> OpenVINO IR model folder, and the manifest that marks it finished.

A model folder is valid iff its ``medserve.json`` exists: the manifest is written last, after
the IRs and the tokenizer checks, so a killed export never looks usable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

WeightFormat = Literal["int8", "fp16", "int4", "fp32"]

MANIFEST_NAME = "medserve.json"
# openvino_genai needs the tokenizer IRs beside the model: without them it cannot load at all.
REQUIRED_IR_FILES = ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
INT4_GROUP_SIZES = (128, 64, 32)


class ExportError(RuntimeError):
    """An export or a check of an exported folder failed."""


def export_openvino(
    hf_dir: Path,
    out_dir: Path,
    weight_format: WeightFormat,
    group_size: int | None = None,
    progress: bool = True,
    python: str | None = None,
) -> Path:
    """Export ``hf_dir`` with ``optimum-cli export openvino`` into ``out_dir`` (created).

    int4 needs a group size dividing the hidden size: when ``group_size`` is None the largest
    of 128/64/32 that divides it is used, and ``--group-size-fallback adjust`` covers layers
    whose width still does not fit. ``python`` is the interpreter whose optimum runs the
    export (default: this one); a layout that needs another transformers version passes the
    converter environment's (``medserve.models.layouts``).
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if weight_format not in ("int8", "fp16", "int4", "fp32"):
        raise ValueError(f"weight_format={weight_format!r}: use int8, fp16, int4 or fp32")
    if weight_format != "int4" and group_size is not None:
        raise ValueError(f"group_size={group_size} only applies to int4, not {weight_format}")
    command = [
        *_optimum_cli(python),
        "export",
        "openvino",
        "--model",
        str(hf_dir),
        "--task",
        "text-generation-with-past",
        "--weight-format",
        weight_format,
    ]
    if weight_format == "int4":
        size = group_size or _int4_group_size(hf_dir)
        command += ["--group-size", str(size), "--group-size-fallback", "adjust"]
    command.append(str(out_dir))

    env = dict(os.environ)
    # Local folders only: never let a typo turn into a model-hub download.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    # The torch tracer prints pages of TracerWarnings that hide the real progress lines.
    env.setdefault("PYTHONWARNINGS", "ignore")
    result = subprocess.run(
        command,
        env=env,
        stdout=None if progress else subprocess.PIPE,
        stderr=None if progress else subprocess.STDOUT,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout or "").splitlines()[-30:])
        raise ExportError(
            f"optimum-cli export of {hf_dir} ({weight_format}) failed with exit code "
            f"{result.returncode}: {' '.join(command)}\n{tail}"
        )
    # optimum only warns when the tokenizer conversion fails, so check the files ourselves.
    missing = [name for name in REQUIRED_IR_FILES if not (out_dir / name).is_file()]
    if missing:
        raise ExportError(f"export to {out_dir} finished without {', '.join(missing)}")
    return out_dir


def verify_ov_tokenizer(
    model_dir: Path,
    *,
    samples: Sequence[str],
    messages: Sequence[Mapping[str, str]],
    expected_prompt: str,
) -> None:
    """Check the exported tokenizer IRs the way the server uses them (openvino_genai).

    Each sample must survive encode -> decode unchanged (spaces, newlines, UTF-8), and the
    chat template carried in the IR must render ``messages`` to ``expected_prompt``.
    """
    import openvino_genai

    tokenizer = openvino_genai.Tokenizer(str(model_dir))
    for text in samples:
        ids = tokenizer.encode(text).input_ids.data.tolist()[0]
        decoded = tokenizer.decode(ids)
        if decoded != text:
            raise ExportError(
                f"tokenizer IR in {model_dir} does not round-trip {text!r}: got {decoded!r}"
            )
    prompt = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    if prompt != expected_prompt:
        raise ExportError(
            f"chat template in {model_dir} renders {prompt!r}, expected {expected_prompt!r}"
        )


def write_manifest(model_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``medserve.json`` atomically; adds ``created`` when absent."""
    data = {**manifest}
    data.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The manifest of a finished model folder, or None when absent or unreadable."""
    try:
        data = json.loads((Path(model_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_valid_model_dir(model_dir: Path) -> bool:
    """A folder the server can load: a readable manifest and the three IRs."""
    model_dir = Path(model_dir)
    return read_manifest(model_dir) is not None and all(
        (model_dir / name).is_file() for name in REQUIRED_IR_FILES
    )


@contextmanager
def staged_dir(final_dir: Path) -> Iterator[Path]:
    """Yield an empty sibling folder; on success it replaces ``final_dir`` in one rename.

    On error the staging folder is removed and ``final_dir`` is left as it was, so an
    interrupted build never leaves a half folder under the final name.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = final_dir.with_name(f".{final_dir.name}.partial")
    # A leftover from a killed run: nothing in it can be trusted.
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(stage, final_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _optimum_cli(python: str | None = None) -> list[str]:
    # A named interpreter's own optimum, never an optimum-cli found on PATH or with a stale
    # shebang from a moved virtual environment.
    return [python or sys.executable, "-m", "optimum.commands.optimum_cli"]


def _int4_group_size(hf_dir: Path) -> int:
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    hidden = int(config.get("hidden_size", 0))
    for size in INT4_GROUP_SIZES:
        if hidden and hidden % size == 0:
            return size
    return INT4_GROUP_SIZES[0]  # the fallback option adjusts per layer
