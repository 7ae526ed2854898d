"""A data-only copy of a Hugging Face folder, for llama.cpp's converter to read.

Why: ``convert_hf_to_gguf.py`` calls ``AutoTokenizer.from_pretrained(..., trust_remote_code=True)``
for several architectures (ChatGLM, GLM-4, Qwen, ...), which imports any ``*.py`` the folder's
``auto_map`` names. medserve never runs code that came with the weights, so the converter reads
this copy instead: no Python files at all, and no ``auto_map`` in any JSON file, so there is
nothing for transformers to import even if asked to. Weights are hard links (symlinks across
file systems), never copies: a 9B checkpoint costs no disk here; the small config and tokenizer
files are real copies, so rewriting them cannot touch the source.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

# Linked, not copied: big, read as data only (safetensors, or torch.load(weights_only=True)).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Never staged: code transformers could import, or compiled code.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so")
# The keys through which a config names remote code to import.
REMOTE_CODE_KEYS = ("auto_map",)


class StagingError(ValueError):
    """The folder cannot be staged (unreadable JSON, missing folder)."""


@dataclass
class StagedFolder:
    path: Path
    linked: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    sanitized: list[str] = field(default_factory=list)
    """JSON files whose ``auto_map`` was removed."""
    skipped: list[str] = field(default_factory=list)
    """Code files, hidden files and subfolders left out."""


def stage_hf_folder(src: Path, dest: Path) -> StagedFolder:
    """Fill the new folder ``dest`` with the data files of ``src`` (top level only)."""
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise StagingError(f"{src} is not a folder")
    dest.mkdir(parents=True, exist_ok=False)
    staged = StagedFolder(dest)
    for entry in sorted(src.iterdir()):
        name = entry.name
        # Subfolders (original/, onnx/, .cache/) are not read by the converter.
        if name.startswith(".") or not entry.is_file() or name.endswith(CODE_SUFFIXES):
            staged.skipped.append(name)
        elif name.endswith(WEIGHT_SUFFIXES):
            link_file(entry, dest / name)
            staged.linked.append(name)
        elif name.endswith(".json"):
            if write_without_remote_code(entry, dest / name):
                staged.sanitized.append(name)
            staged.copied.append(name)
        else:
            # follow_symlinks: a hub cache snapshot holds links to blobs; stage the content.
            shutil.copyfile(entry, dest / name)
            staged.copied.append(name)
    return staged


def link_file(src: Path, dest: Path) -> None:
    """Hard link to the file's content (through any symlink); a symlink across file systems."""
    target = Path(src).resolve()
    try:
        os.link(target, dest)
    except OSError:  # EXDEV, or a file system without hard links
        os.symlink(target, dest)


def write_without_remote_code(src: Path, dest: Path) -> bool:
    """Copy the JSON file ``src`` to ``dest`` without its remote-code keys; True if it had any."""
    try:
        data = json.loads(Path(src).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StagingError(f"{src} is not readable JSON: {exc}") from exc
    found = isinstance(data, dict) and any(key in data for key in REMOTE_CODE_KEYS)
    if not found:
        shutil.copyfile(src, dest)
        return False
    clean = {key: value for key, value in data.items() if key not in REMOTE_CODE_KEYS}
    dest.write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True
