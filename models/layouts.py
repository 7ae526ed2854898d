"""Which checkpoint layout a Hugging Face folder has, and how medserve turns it into IR.

Hospitals hold GLM-family checkpoints in three layouts, all called "GLM-4" or "ChatGLM":

- ``chatglm``: ChatGLM2-6B, ChatGLM3-6B (-base/-32k/-128k), GLM-4-9B-chat (-1m). They ship
  ``modeling_chatglm.py`` remote code, which medserve never runs: the weights are converted
  into the transformers-native ``glm`` layout first (``models/chatglm_convert.py``).
- ``glm``: GLM-4-9B-chat-hf. optimum-intel exports it only with transformers <= 5.0, so its
  export runs in the separate converter environment ``.venv-convert-glm``.
- ``glm4``: GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1: exported in the main environment.

Everything else is handed to optimum-intel as it is, in the main environment.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ExportEnv = Literal["main", "convert-glm"]

CONVERT_GLM_VENV_VAR = "MEDSERVE_CONVERT_GLM_VENV"
"""Overrides where the ``convert-glm`` environment lives (default: beside the main venv)."""
# optimum-intel 2.2.0 caps these model types at transformers 5.0 (GLMOpenVINOConfig).
_CONVERTER_ENV_TYPES = {"glm": "convert-glm"}
# ChatGLM-6B (v1) and GLM-130B use 2D positions and post-norm blocks: no native layout exists.
_UNSUPPORTED_CHATGLM_KEYS = ("position_encoding_2d", "inner_hidden_size")


class LayoutError(ValueError):
    """The folder is not a checkpoint medserve knows how to convert."""


@dataclass(frozen=True)
class Layout:
    """How one checkpoint folder becomes an OpenVINO IR folder."""

    model_type: str
    """``model_type`` as the folder's config.json states it."""
    family: str
    """Human name of the family, for messages and the manifest."""
    convert_chatglm: bool
    """True when the weights must first be converted from ``chatglm`` to ``glm``."""
    export_model_type: str
    """The model type optimum-intel sees (after any conversion)."""
    export_env: ExportEnv
    """Which virtual environment runs ``optimum-cli export openvino``."""


def read_config(hf_dir: Path) -> dict[str, Any]:
    """The folder's config.json as a dict; LayoutError when missing or not a config."""
    path = Path(hf_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayoutError(f"{hf_dir} is not a Hugging Face model folder: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise LayoutError(f"{path} has no model_type")
    return config


def detect_layout(hf_dir: Path) -> Layout:
    """Read ``hf_dir/config.json`` and say how it is exported (no weights are read)."""
    config = read_config(hf_dir)
    model_type = config["model_type"]
    if model_type == "chatglm":
        return Layout(
            model_type="chatglm",
            family=chatglm_family(config, hf_dir),
            convert_chatglm=True,
            export_model_type="glm",
            export_env=_export_env("glm"),
        )
    families = {"glm": "GLM-4-9B-chat-hf", "glm4": "GLM-4-0414 / GLM-Z1"}
    return Layout(
        model_type=model_type,
        family=families.get(model_type, model_type),
        convert_chatglm=False,
        export_model_type=model_type,
        export_env=_export_env(model_type),
    )


def chatglm_family(config: dict[str, Any], hf_dir: Path) -> str:
    """ChatGLM2/3-6B (SentencePiece vocabulary) or GLM-4-9B-chat (tiktoken-style vocabulary).

    The tokenizer class in tokenizer_config.json tells them apart (``ChatGLMTokenizer`` vs
    ``ChatGLM4Tokenizer``); without one, the vocabulary size does (65024 vs 151552).
    Refuses ChatGLM-6B v1: its 2D rotary positions and GLM-130B-style blocks have no
    transformers-native counterpart, so no conversion could be exact.
    """
    if any(key in config for key in _UNSUPPORTED_CHATGLM_KEYS) or "kv_channels" not in config:
        raise LayoutError(
            f"{hf_dir} is a first-generation ChatGLM-6B checkpoint (2D positions); medserve "
            f"supports ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat in the chatglm layout"
        )
    try:
        tokenizer_config = json.loads((Path(hf_dir) / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        tokenizer_config = {}
    tokenizer_class = str(tokenizer_config.get("tokenizer_class", ""))
    if tokenizer_class:
        return "GLM-4-9B-chat" if tokenizer_class == "ChatGLM4Tokenizer" else "ChatGLM2/3-6B"
    vocab = int(config.get("padded_vocab_size") or config.get("vocab_size") or 0)
    return "GLM-4-9B-chat" if vocab >= 150000 else "ChatGLM2/3-6B"


def export_python(layout: Layout) -> str:
    """The interpreter that runs optimum-cli for ``layout``; a clear error when it is missing.

    The ``convert-glm`` environment is ``.venv-convert-glm`` beside the main one (as
    installer/setup.sh creates it), or ``$MEDSERVE_CONVERT_GLM_VENV``.
    """
    if layout.export_env == "main":
        return sys.executable
    default = Path(sys.prefix).parent / ".venv-convert-glm"
    venv = Path(os.environ.get(CONVERT_GLM_VENV_VAR) or default)
    python = venv / "bin" / "python"
    if not python.is_file():
        raise LayoutError(
            f"{layout.family} (model_type {layout.export_model_type}) is exported with "
            f"transformers 5.0 in the converter environment {venv}, which is missing: run "
            f"`bash installer/setup.sh` (it creates it) or set {CONVERT_GLM_VENV_VAR}"
        )
    return str(python)


def _export_env(model_type: str) -> ExportEnv:
    return "convert-glm" if model_type in _CONVERTER_ENV_TYPES else "main"
