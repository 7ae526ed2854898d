"""Serve a GGUF file as it is: a model folder holding it (linked, not converted) + medserve.json.

Hospitals often hold GGUF files already, and the bundled SmolLM2 ships as one. The llama.cpp
engine reads GGUF natively, so nothing is converted: the file is hard-linked into
``models_dir/NAME`` when it is on the same file system (no second copy of the weights), copied
otherwise, and checked (sha256) either way. The manifest is read from the file's own metadata
(architecture, trained context, quantization type) with the ``gguf`` package, which reads
headers only and runs nothing from the file.

    medserve export --engine llama-cpp --gguf FILE --name NAME [--models-dir D]
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from medserve.models.manifest import ModelManifest, sha256_of, write_manifest
from medserve.quant.export import ExportError, staged_dir

ENGINE = "llama-cpp"
FORMAT = "gguf"
MODEL_FILE = "model.gguf"


def gguf_metadata(path: Path) -> dict[str, Any]:
    """architecture, context_length, precision and chat-template presence of a GGUF file."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors on a bad file
        raise ExportError(f"{path} is not a readable GGUF file: {exc}") from exc

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    architecture = field("general.architecture")
    if not isinstance(architecture, str):
        raise ExportError(f"{path} has no general.architecture: not a model GGUF")
    file_type = field("general.file_type")
    try:
        precision = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").lower()
    except (TypeError, ValueError):
        precision = "unknown"
    return {
        "architecture": architecture,
        "context_length": int(field(f"{architecture}.context_length") or 0),
        "precision": precision,
        "has_chat_template": field("tokenizer.chat_template") is not None,
        "name": field("general.name") or "",
    }


def register_gguf(
    gguf_file: Path, models_dir: Path, name: str, *, source: dict[str, Any] | None = None
) -> Path:
    """Make ``models_dir/name`` serve ``gguf_file`` with the llama.cpp engine; return it."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise ExportError(f"{gguf_file} does not exist")
    meta = gguf_metadata(gguf_file)
    final = Path(models_dir) / name
    with staged_dir(final) as stage:
        target = stage / MODEL_FILE
        try:
            os.link(gguf_file, target)
        except OSError:  # another file system, or links not allowed: a copy
            shutil.copyfile(gguf_file, target)
        manifest = ModelManifest(
            name=name,
            precision=meta["precision"],
            architecture=meta["architecture"],
            context_length=meta["context_length"],
            engine=ENGINE,
            format=FORMAT,
            source={
                "gguf": gguf_file.name,
                "sha256": sha256_of(target),
                "gguf_name": meta["name"],
                **(source or {}),
            },
        )
        write_manifest(stage, manifest)
    return final
