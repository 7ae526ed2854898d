"""Read a Hugging Face folder written by transformers 5 with transformers 4.47 (ipex-llm's).

The bundled model's HF folder is written by the main environment's transformers 5.5, which
ipex-llm cannot use (it needs transformers <= 4.47). Two things of that format do not read
back in 4.47, and both fail silently or late:

- the rotary base moved into ``rope_parameters``: 4.47 does not know that key and falls
  back to rope_theta 10000 (SmolLM2 was trained with 100000), so the model loads and talks,
  only worse;
- the tokenizer class ``TokenizersBackend`` (a plain ``tokenizer.json``) and the separate
  ``chat_template.jinja`` are unknown to 4.47's AutoTokenizer.

So the config's rotary settings are carried over, and the tokenizer is built from
``tokenizer.json`` with the special tokens of ``tokenizer_config.json`` and the template file,
then checked token for token against the ``tokenizers`` library reading the same file.
Runs inside .venv-ipex-llm (imports transformers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class FolderCompatError(RuntimeError):
    """The HF folder cannot be read faithfully by this transformers version."""


def load_config(hf_dir: Path) -> Any:
    """AutoConfig of ``hf_dir`` with transformers-5 rotary settings mapped to 4.x names."""
    from transformers import AutoConfig

    raw = _read_json(hf_dir / "config.json")
    try:
        config = AutoConfig.from_pretrained(
            str(hf_dir), trust_remote_code=False, local_files_only=True
        )
    except (ValueError, KeyError) as exc:
        raise FolderCompatError(
            f"transformers in this environment cannot load model_type "
            f"{raw.get('model_type')!r} from {hf_dir}: {exc}"
        ) from exc
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in raw:
        if "rope_theta" in rope:
            config.rope_theta = float(rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            config.rope_scaling = scaling
    return config


def load_tokenizer(hf_dir: Path) -> Any:
    """The folder's tokenizer as a transformers 4.x fast tokenizer, chat template attached."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(hf_dir), trust_remote_code=False, local_files_only=True
        )
    except (ValueError, OSError, KeyError):
        tokenizer_file = hf_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FolderCompatError(
                f"{hf_dir}: the tokenizer cannot be loaded and there is no tokenizer.json"
            ) from None
        settings = _read_json(hf_dir / "tokenizer_config.json")
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(tokenizer_file),
            clean_up_tokenization_spaces=bool(settings.get("clean_up_tokenization_spaces")),
            model_max_length=int(settings.get("model_max_length") or 1_000_000_000),
            **{k: settings[k] for k in SPECIAL_TOKEN_KEYS if isinstance(settings.get(k), str)},
        )
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _chat_template(hf_dir)
    return tokenizer


def check_tokenizer(tokenizer: Any, hf_dir: Path, samples: Sequence[str]) -> None:
    """Same ids as the ``tokenizers`` library on tokenizer.json, and exact round trips."""
    from tokenizers import Tokenizer

    tokenizer_file = hf_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        return  # a slow (SentencePiece) tokenizer loaded by AutoTokenizer: nothing to compare
    reference = Tokenizer.from_file(str(tokenizer_file))
    for text in samples:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        expected = reference.encode(text, add_special_tokens=False).ids
        if ids != expected:
            raise FolderCompatError(
                f"tokenizer of {hf_dir} encodes {text!r} as {ids[:12]}..., "
                f"tokenizer.json as {expected[:12]}..."
            )
        # Only where the format itself keeps the text (SentencePiece may drop a lead space).
        if reference.decode(expected, skip_special_tokens=False) == text and (
            tokenizer.decode(ids, skip_special_tokens=False) != text
        ):
            raise FolderCompatError(f"tokenizer of {hf_dir} does not round-trip {text!r}")


def save_tokenizer(tokenizer: Any, out_dir: Path, samples: Sequence[str]) -> None:
    """Save for transformers 4.x (chat template inside) and prove the copy behaves the same.

    The saved tokenizer must load natively, with no fallback, since that is how the engine
    loads it; and encode every sample (special tokens as added) and render the chat template
    exactly as the tokenizer it was saved from.
    """
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(out_dir))
    saved = AutoTokenizer.from_pretrained(
        str(out_dir), trust_remote_code=False, local_files_only=True
    )
    for text in samples:
        if list(saved.encode(text)) != list(tokenizer.encode(text)):
            raise FolderCompatError(f"the saved tokenizer encodes {text!r} differently")
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        rendered = [
            t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for t in (tokenizer, saved)
        ]
        if rendered[0] != rendered[1]:
            raise FolderCompatError(f"the saved chat template renders {rendered[1]!r}")


def load_generation_config(hf_dir: Path) -> Any | None:
    """generation_config.json of the source (its EOS ids end a turn), None when absent."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except OSError:
        return None


def _chat_template(hf_dir: Path) -> str | None:
    jinja, as_json = (hf_dir / name for name in TEMPLATE_FILES)
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if as_json.is_file():
        template = _read_json(as_json).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise FolderCompatError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise FolderCompatError(f"{path}: expected a JSON object")
    return data
