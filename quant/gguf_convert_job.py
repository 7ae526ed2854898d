"""Run llama.cpp's ``convert_hf_to_gguf.py`` on a staged folder, with medserve's fixes.

    python -m medserve.quant.gguf_convert_job --converter DIR -- MODEL_DIR --outtype f16 ...

Run by quant/gguf_export.py in a subprocess of the main environment (torch, transformers);
``DIR`` holds the converter as installer/llama_cpp_convert.sh copies it. The converter's own
``main()`` does the work; this module only changes what it gets wrong for the checkpoints
medserve converts, each fix narrow and explained below:

- No code from the model folder, ever. The converter calls
  ``AutoTokenizer.from_pretrained(..., trust_remote_code=True)``. The staged folder has no
  ``*.py`` and no ``auto_map`` already; here transformers' dynamic-module loader is replaced
  by one that refuses, so even a folder that slipped through cannot run code.
- ``glm`` hyperparameters (GLM-4-9B-chat-hf and converted chatglm checkpoints): the converter's
  ``ChatGLMModel`` reads the chatglm keys ``seq_length``, ``layernorm_epsilon``,
  ``rope_ratio`` and ``attention_dim`` only; without them it would write a context length equal
  to the hidden size, eps 1e-5 and rope base 10000 (GLM-4 uses 1.5625e-7 and 5e6). They are
  derived from the glm keys (``max_position_embeddings``, ``rms_norm_eps``, ``rope_theta``,
  ``head_dim``) when missing.
- ChatGLM2/3 vocabularies: the converter reads them only through the remote tokenizer (and only
  when ``_name_or_path`` names THUDM/chatglm3-6b); otherwise it tries byte-level BPE, wrong for a
  SentencePiece model. When the staged folder holds the SentencePiece ``tokenizer.model``, the
  vocabulary is written as upstream's ``set_vocab_chatglm3`` writes it (pieces, scores, types),
  read with medserve's own parser; the appended special tokens keep the spelling of the
  converted tokenizer.json (``<sop>``, as in the chat template).
- Llama-family vocabularies: the converter imports ``sentencepiece`` before it looks for a
  ``tokenizer.model``, so a byte-level BPE model (Llama 3, SmolLM2) would fail on the missing
  package instead of falling through to its tokenizer.json path; the file is looked for first.
- GLM turn ends: ``<|user|>`` and ``<|observation|>`` become llama.cpp's eot/eom tokens, so
  llama.cpp stops on all of the family's stop tokens (``mark_turn_ends``).
- Pre-tokenizer detection: the converter names the BPE pre-tokenizer by hashing the ids of a
  fixed text, so a tokenizer with the GLM-4 regex but another vocabulary (a tiny test model, or
  a re-converted rank file) is refused. When the hash is unknown and the tokenizer.json's
  split regex is exactly one llama.cpp implements, that name is used instead.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path
from typing import Any

from medserve.models.tiktoken_ranks import GLM4_PATTERN

# tokenizer.json split regex -> llama.cpp pre-tokenizer name (src/llama-vocab.cpp).
# GLM-4's: "glm4" when tokenizer.json ignores merges (tiktoken semantics), else "chatglm-bpe".
_KNOWN_SPLIT_PATTERNS = {GLM4_PATTERN: ("glm4", "chatglm-bpe")}
_GLM_KEYS = {
    "seq_length": "max_position_embeddings",
    "layernorm_epsilon": "rms_norm_eps",
    "attention_dim": "head_dim",
}


class RemoteCodeRefused(RuntimeError):
    """transformers was asked to import code shipped with a model."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m medserve.quant.gguf_convert_job")
    parser.add_argument("--converter", type=Path, required=True)
    parser.add_argument("converter_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    script = args.converter / "convert_hf_to_gguf.py"
    converter_args = [a for a in args.converter_args if a != "--"]
    sys.path[:0] = [str(args.converter), str(args.converter / "gguf-py")]
    refuse_remote_code()
    patch_converter()
    sys.argv = [str(script), *converter_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def refuse_remote_code() -> None:
    """Make transformers' loader of model-folder code raise instead of importing it."""
    from transformers import dynamic_module_utils

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RemoteCodeRefused(
            "the converter asked for code from the model folder; medserve never runs it"
        )

    # get_class_from_dynamic_module (which AutoConfig/AutoTokenizer/AutoModel import by name)
    # fetches and imports through these two module globals: replacing them covers every caller.
    dynamic_module_utils.get_cached_module_file = refuse
    dynamic_module_utils.get_class_in_module = refuse


def patch_converter() -> None:
    from conversion.base import TextModel
    from conversion.chatglm import ChatGLMModel

    original_pre = TextModel.get_vocab_base_pre
    original_sentencepiece = TextModel._create_vocab_sentencepiece
    original_vocab = ChatGLMModel.set_vocab
    original_params = ChatGLMModel.set_gguf_parameters

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original_pre(self, tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_by_pattern(Path(self.dir_model) / "tokenizer.json")
            if name is None:
                raise
            print(f"[medserve export] pre-tokenizer {name!r} (by its split regex)", flush=True)
            return name

    def set_vocab(self: Any) -> None:
        if is_sentencepiece(Path(self.dir_model) / "tokenizer.model"):
            write_sentencepiece_vocab(self)
        else:
            original_vocab(self)
        # The chat template and the HF tokenizer put [gMASK]<sop> in front themselves; the
        # converter says add_bos=False, but gguf's SpecialVocab turns it back on from the
        # tokenizer.json post-processor ([gMASK] as "bos"), which would prefix it twice.
        self.gguf_writer.add_add_bos_token(False)
        mark_turn_ends(self.gguf_writer, Path(self.dir_model) / "tokenizer.json")

    def set_gguf_parameters(self: Any) -> None:
        if self.hparams.get("model_type") == "glm":
            add_chatglm_keys(self.hparams, self.rope_parameters)
        original_params(self)

    def create_vocab_sentencepiece(self: Any) -> Any:
        path = Path(self.dir_model) / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"File not found: {path}")
        return original_sentencepiece(self)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece
    ChatGLMModel.set_vocab = set_vocab
    ChatGLMModel.set_gguf_parameters = set_gguf_parameters


def add_chatglm_keys(hparams: dict[str, Any], rope_parameters: dict[str, Any]) -> None:
    """The chatglm spellings of a glm config's keys, where the config lacks them."""
    for chatglm_key, glm_key in _GLM_KEYS.items():
        if chatglm_key not in hparams and hparams.get(glm_key) is not None:
            hparams[chatglm_key] = hparams[glm_key]
    theta = rope_parameters.get("rope_theta", hparams.get("rope_theta"))
    if "rope_ratio" not in hparams and theta is not None:
        hparams["rope_ratio"] = float(theta) / 10000.0


def pre_tokenizer_by_pattern(tokenizer_json: Path) -> str | None:
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ignore_merges = bool((data.get("model") or {}).get("ignore_merges"))
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        regex = ((step or {}).get("pattern") or {}).get("Regex")
        if step.get("type") == "Split" and regex in _KNOWN_SPLIT_PATTERNS:
            with_ignore, without = _KNOWN_SPLIT_PATTERNS[regex]
            return with_ignore if ignore_merges else without
    return None


def is_sentencepiece(path: Path) -> bool:
    """A SentencePiece model file (ChatGLM2/3), not absent nor GLM-4's tiktoken rank file."""
    from medserve.models.sentencepiece_model import (
        SentencePieceFormatError,
        read_sentencepiece_model,
    )

    if not path.is_file():
        return False
    try:
        read_sentencepiece_model(path)
    except (SentencePieceFormatError, OSError, ValueError):
        return False
    return True


def write_sentencepiece_vocab(model: Any) -> None:
    """ChatGLM2/3's vocabulary as upstream's ``set_vocab_chatglm3`` writes it, no remote code.

    Ids below the SentencePiece size are its pieces (type and score from the model file); the
    tokens appended after them ([MASK], [gMASK], <sop>, roles) are CONTROL, spelled as the
    converted tokenizer.json spells them; unused rows up to the padded size are [PADn].
    """
    from conversion.base import SentencePieceTokenTypes, gguf
    from medserve.models.sentencepiece_model import PieceType, read_sentencepiece_model

    folder = Path(model.dir_model)
    sp = read_sentencepiece_model(folder / "tokenizer.model")
    kinds = {
        PieceType.NORMAL: SentencePieceTokenTypes.NORMAL,
        PieceType.UNKNOWN: SentencePieceTokenTypes.UNKNOWN,
        PieceType.CONTROL: SentencePieceTokenTypes.CONTROL,
        PieceType.USER_DEFINED: SentencePieceTokenTypes.USER_DEFINED,
        PieceType.UNUSED: SentencePieceTokenTypes.UNUSED,
        PieceType.BYTE: SentencePieceTokenTypes.BYTE,
    }
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = {
        int(t["id"]): (str(t["content"]), bool(t.get("special")))
        for t in tokenizer_json["added_tokens"]
    }
    control = SentencePieceTokenTypes.CONTROL
    vocab_size = int(model.hparams.get("padded_vocab_size") or model.hparams["vocab_size"])
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for token_id in range(vocab_size):
        if token_id < len(sp.pieces):
            piece = sp.pieces[token_id]
            tokens.append(piece.text.encode("utf-8"))
            scores.append(float(piece.score))
            types.append(kinds[piece.kind])
        elif token_id in added:
            text, special = added[token_id]
            tokens.append(text.encode("utf-8"))
            scores.append(0.0)
            types.append(control if special else SentencePieceTokenTypes.USER_DEFINED)
        else:
            tokens.append(f"[PAD{token_id}]".encode())
            scores.append(0.0)
            types.append(SentencePieceTokenTypes.UNUSED)
    writer = model.gguf_writer
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("chatglm-spm")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(sp.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(sp.remove_extra_whitespaces)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer)


def mark_turn_ends(writer: Any, tokenizer_json: Path) -> None:
    """Make llama.cpp stop where the official chat() stops: ``<|user|>`` and ``<|observation|>``.

    llama.cpp ends generation on eos, eot and eom only (plus a list of known texts GLM's role
    tokens are not in). eot = ``<|user|>`` is what upstream writes for GLM-4; eom = "end of
    message, a tool answers next" is exactly ``<|observation|>``. Without them a served GLM
    would write the next user turn itself.
    """
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    ids = {str(t["content"]): int(t["id"]) for t in data.get("added_tokens", [])}
    if "<|user|>" in ids:
        writer.add_eot_token_id(ids["<|user|>"])
    if "<|observation|>" in ids:
        writer.add_eom_token_id(ids["<|observation|>"])


if __name__ == "__main__":
    sys.exit(main())
