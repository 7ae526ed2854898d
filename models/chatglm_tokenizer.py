"""Convert a ChatGLM-family tokenizer folder, as downloaded, into a plain fast tokenizer.

Why: ChatGLM2/3 and GLM-4-9B-chat ship their tokenizer as remote code
(``tokenization_chatglm.py``) over a ``tokenizer.model`` that transformers cannot read by
itself. The server never runs code from a checkpoint, so the vocabulary is read here (a
SentencePiece model for ChatGLM2/3, a tiktoken rank file for GLM-4) and written as
``tokenizer.json`` + ``tokenizer_config.json`` (with a chat template) that transformers and
openvino_tokenizers load with no remote code. GLM-4-9B-chat-hf and GLM-4-0414 already ship
that; their files are checked and passed through.

The ids of every prompt equal the official tokenizer's (``build_chat_input``, ``build_prompt``
or ``apply_chat_template``); tests/unit/test_chatglm_tokenizers.py proves it on fixtures made
with the official code.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from medserve.models.chatglm_templates import (
    CHATGLM2_TEMPLATE,
    CHATGLM3_TEMPLATE,
    GLM4_CHATGLM_TEMPLATE,
)
from medserve.models.sentencepiece_model import (
    ModelType,
    PieceType,
    SentencePieceFormatError,
    SentencePieceModel,
    read_sentencepiece_model,
)
from medserve.models.tiktoken_ranks import GLM4_PATTERN, RankFileError, read_ranks, vocab_and_merges

FamilyName = Literal["chatglm2", "chatglm3", "glm4-chatglm", "glm4-hf", "glm4-0414"]
FAMILIES: tuple[FamilyName, ...] = get_args(FamilyName)

# Appended after the SentencePiece pieces by ChatGLM2/3's tokenization_chatglm.py, in id order.
# "sop"/"eop" are spelled <sop>/<eop> here (same ids): as bare words they would be matched
# inside ordinary text ("people" contains "eop", "isopropyl" contains "sop"), which the
# official build_chat_input / build_prompt never do.
CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")
CHATGLM3_SPECIALS = (
    *CHATGLM2_SPECIALS,
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
_OFFICIAL_SPELLING = {"sop": "<sop>", "eop": "<eop>"}
GLM4_EOS = "<|endoftext|>"
# Generation stops on these (the official chat() and generation_config.json).
STOP_TOKENS: dict[FamilyName, tuple[str, ...]] = {
    "chatglm2": ("</s>",),
    "chatglm3": ("</s>", "<|user|>", "<|observation|>"),
    "glm4-chatglm": (GLM4_EOS, "<|user|>", "<|observation|>"),
    "glm4-hf": (GLM4_EOS, "<|user|>", "<|observation|>"),
    "glm4-0414": (GLM4_EOS, "<|user|>", "<|observation|>"),
}
# Files a pass-through copies when present (chat_template.jinja holds the template in newer
# exports). Nothing executable is ever copied.
_PASS_THROUGH_FILES = ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja")
_WRITTEN_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_STALE_FILES = (
    "tokenizer.model",
    "tokenization_chatglm.py",
    "added_tokens.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


class TokenizerConversionError(ValueError):
    """The folder's tokenizer is not one this module understands, or a check failed."""


@dataclass(frozen=True)
class TokenizerFamily:
    """What the weights conversion needs to know about the tokenizer it placed beside them."""

    name: FamilyName
    stop_token_ids: tuple[int, ...]  # eos first: generation_config.json "eos_token_id"
    stop_tokens: tuple[str, ...]
    eos_token_id: int
    pad_token_id: int
    vocab_size: int  # highest id + 1, special tokens included


def detect_family(src_dir: Path) -> FamilyName:
    """Which ChatGLM family ``src_dir`` holds, from its config and tokenizer files only."""
    src_dir = Path(src_dir)
    config = _read_json(src_dir / "config.json")
    model_type = config.get("model_type")
    if model_type == "glm":
        return "glm4-hf"
    if model_type == "glm4":
        return "glm4-0414"
    if model_type != "chatglm":
        raise TokenizerConversionError(
            f"{src_dir / 'config.json'}: model_type {model_type!r} is not a ChatGLM family model"
        )
    model_file = src_dir / "tokenizer.model"
    if not model_file.is_file():
        if (src_dir / "ice_text.model").is_file():
            raise TokenizerConversionError(
                f"{src_dir} is a first-generation ChatGLM-6B (icetk tokenizer): not supported; "
                f"use ChatGLM2-6B, ChatGLM3-6B or GLM-4"
            )
        raise TokenizerConversionError(f"{src_dir} has no tokenizer.model")
    if model_file.read_bytes()[:1] == b"\x0a":  # protobuf field 1 (pieces): SentencePiece
        return "chatglm3" if _has_role_tokens(src_dir, config) else "chatglm2"
    return "glm4-chatglm"


def convert_chatglm_tokenizer(src_dir: Path, out_dir: Path) -> TokenizerFamily:
    """Write a transformers-loadable fast tokenizer for ``src_dir`` into ``out_dir``.

    Reads the folder as downloaded from the hub and never imports anything from it. Writes
    tokenizer.json, tokenizer_config.json (chat template, no auto_map) and
    special_tokens_map.json; returns the family and its stop token ids.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    family = detect_family(src_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if src_dir.resolve() != out_dir.resolve():
        for name in _STALE_FILES:
            (out_dir / name).unlink(missing_ok=True)
    if family in ("glm4-hf", "glm4-0414"):
        _pass_through(src_dir, out_dir)
    elif family == "glm4-chatglm":
        _write_fast(
            out_dir,
            _glm4_tokenizer(src_dir),
            GLM4_CHATGLM_TEMPLATE,
            _context(src_dir),
            eos=GLM4_EOS,
            pad=GLM4_EOS,
            unk=None,
        )
    else:
        specials = CHATGLM3_SPECIALS if family == "chatglm3" else CHATGLM2_SPECIALS
        template = CHATGLM3_TEMPLATE if family == "chatglm3" else CHATGLM2_TEMPLATE
        tokenizer, pieces = _sentencepiece_tokenizer(src_dir, specials)
        _write_fast(
            out_dir,
            tokenizer,
            template,
            _context(src_dir),
            eos=pieces.eos,
            pad=pieces.unk,
            unk=pieces.unk,
        )
    return _describe(out_dir, family)


@dataclass(frozen=True)
class _ControlPieces:
    unk: str
    eos: str


def _sentencepiece_tokenizer(src_dir: Path, specials: tuple[str, ...]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    path = src_dir / "tokenizer.model"
    try:
        sp = read_sentencepiece_model(path)
    except SentencePieceFormatError as exc:
        raise TokenizerConversionError(str(exc)) from exc
    _check_supported(sp, path)
    vocab = {piece.text: index for index, piece in enumerate(sp.pieces)}
    if len(vocab) != len(sp.pieces):
        raise TokenizerConversionError(f"{path}: duplicate pieces")
    bpe = models.BPE(
        vocab=vocab,
        merges=_sentencepiece_merges(sp, vocab),
        unk_token=sp.pieces[sp.unk_id].text,
        fuse_unk=True,
        byte_fallback=sp.byte_fallback,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence(_sentencepiece_normalizers(sp, Regex))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if sp.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)

    control = [p.text for p in sp.pieces if p.kind in (PieceType.CONTROL, PieceType.UNKNOWN)]
    user_defined = [p.text for p in sp.pieces if p.kind == PieceType.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    first = len(sp.pieces)
    _check_declared_specials(src_dir, specials, first)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for offset, token in enumerate(specials):
        if tokenizer.token_to_id(token) != first + offset:
            raise TokenizerConversionError(f"{path}: {token} would not get id {first + offset}")
    gmask, sop = first + 1, first + 3
    eos = sp.pieces[sp.eos_id].text
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair=f"[gMASK] <sop> $A $B {eos}",
        special_tokens=[("[gMASK]", gmask), ("<sop>", sop), (eos, sp.eos_id)],
    )
    return tokenizer, _ControlPieces(unk=sp.pieces[sp.unk_id].text, eos=eos)


def _check_supported(sp: SentencePieceModel, path: Path) -> None:
    if sp.model_type != ModelType.BPE:
        raise TokenizerConversionError(f"{path}: {sp.model_type.name} model, expected BPE")
    if sp.treat_whitespace_as_suffix or not sp.escape_whitespaces:
        raise TokenizerConversionError(f"{path}: unsupported whitespace handling")


def _sentencepiece_normalizers(sp: SentencePieceModel, regex: type) -> list[Any]:
    """SentencePiece's normalization, in its order: charsmap, spaces, dummy prefix, escape."""
    from tokenizers import normalizers

    steps: list[Any] = []
    if sp.precompiled_charsmap:
        steps.append(normalizers.Precompiled(sp.precompiled_charsmap))
    if sp.remove_extra_whitespaces:
        steps += [
            normalizers.Strip(left=True, right=True),
            normalizers.Replace(regex(" {2,}"), " "),
        ]
    if sp.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    return steps


def _sentencepiece_merges(sp: SentencePieceModel, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of every multi-character piece, by the piece's score (SentencePiece merges
    the adjacent pair whose result scores highest)."""
    mergeable = {p.text for p in sp.pieces if p.kind in (PieceType.NORMAL, PieceType.USER_DEFINED)}
    found: list[tuple[float, int, int, str, str]] = []
    for piece in sp.pieces:
        if piece.kind != PieceType.NORMAL or len(piece.text) < 2:
            continue
        for cut in range(1, len(piece.text)):
            left, right = piece.text[:cut], piece.text[cut:]
            if left in mergeable and right in mergeable:
                found.append((-piece.score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _check_declared_specials(src_dir: Path, specials: tuple[str, ...], first: int) -> None:
    """tokenizer_config.json may list some of the appended tokens: their ids must agree."""
    declared = _read_json(src_dir / "tokenizer_config.json", required=False).get(
        "added_tokens_decoder", {}
    )
    expected = {token: first + offset for offset, token in enumerate(specials)}
    for key, entry in declared.items():
        name = _OFFICIAL_SPELLING.get(entry.get("content"), entry.get("content"))
        if name in expected and int(key) != expected[name]:
            raise TokenizerConversionError(
                f"{src_dir / 'tokenizer_config.json'}: {name} has id {key}, the vocabulary "
                f"puts it at {expected[name]}"
            )


def _glm4_tokenizer(src_dir: Path):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    path = src_dir / "tokenizer.model"
    try:
        ranks = read_ranks(path)
    except RankFileError as exc:
        raise TokenizerConversionError(str(exc)) from exc
    vocab, merges = vocab_and_merges(ranks)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    declared = _read_json(src_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
    specials = sorted((int(key), entry["content"]) for key, entry in declared.items())
    if not specials or [i for i, _ in specials] != list(
        range(len(ranks), len(ranks) + len(specials))
    ):
        raise TokenizerConversionError(
            f"{src_dir / 'tokenizer_config.json'}: added_tokens_decoder must list the special "
            f"tokens at ids {len(ranks)}.. (right after the {len(ranks)} ranks)"
        )
    tokenizer.add_special_tokens(
        [AddedToken(text, special=True, normalized=False) for _, text in specials]
    )
    ids = {text: index for index, text in specials}
    for needed in ("[gMASK]", "<sop>", *STOP_TOKENS["glm4-chatglm"]):
        if needed not in ids:
            raise TokenizerConversionError(f"{src_dir}: no {needed} special token")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", ids["[gMASK]"]), ("<sop>", ids["<sop>"])],
    )
    return tokenizer


def _write_fast(
    out_dir: Path,
    tokenizer,
    template: str,
    context: int | None,
    *,
    eos: str,
    pad: str,
    unk: str | None,
) -> None:
    from transformers import PreTrainedTokenizerFast

    kwargs: dict[str, Any] = {"eos_token": eos, "pad_token": pad}
    if unk is not None:
        kwargs["unk_token"] = unk
    if context:
        kwargs["model_max_length"] = context
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # True would turn "a ." into "a." on decode
        **kwargs,
    )
    fast.chat_template = template
    fast.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = _read_json(out_dir / "tokenizer_config.json")
    # Loadable by every transformers version the converters use; the template inline so
    # both transformers and openvino_tokenizers find it in one place.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = template
    config.pop("auto_map", None)
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_special_tokens_map(out_dir, config)


def _write_special_tokens_map(out_dir: Path, config: dict[str, Any]) -> None:
    """transformers 5 no longer writes special_tokens_map.json; older loaders still read it."""
    path = out_dir / "special_tokens_map.json"
    if path.is_file():
        return
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
    _write_json(path, {key: config[key] for key in keys if config.get(key)})


def _pass_through(src_dir: Path, out_dir: Path) -> None:
    config = _read_json(src_dir / "tokenizer_config.json")
    if not (src_dir / "tokenizer.json").is_file():
        raise TokenizerConversionError(f"{src_dir} has no tokenizer.json")
    template = config.get("chat_template")
    jinja = src_dir / "chat_template.jinja"
    if not template and not jinja.is_file():
        raise TokenizerConversionError(f"{src_dir}: no chat_template in tokenizer_config.json")
    if src_dir.resolve() != out_dir.resolve():
        for name in _PASS_THROUGH_FILES:
            if (src_dir / name).is_file():
                shutil.copyfile(src_dir / name, out_dir / name)
    # A fast tokenizer needs no remote code: drop the pointer so nothing ever looks for it.
    config.pop("auto_map", None)
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_special_tokens_map(out_dir, config)


def _describe(out_dir: Path, family: FamilyName) -> TokenizerFamily:
    """Load what was written, as the server's export will, and read the ids from it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerConversionError(
            f"the tokenizer written to {out_dir} does not load: {exc}"
        ) from exc
    vocab = tokenizer.get_vocab()
    missing = [t for t in (*STOP_TOKENS[family], "[gMASK]", "<sop>") if t not in vocab]
    if missing:
        raise TokenizerConversionError(f"tokenizer in {out_dir} lacks {', '.join(missing)}")
    stop_ids = tuple(vocab[t] for t in STOP_TOKENS[family])
    if tokenizer.eos_token_id != stop_ids[0]:
        raise TokenizerConversionError(
            f"tokenizer in {out_dir}: eos is {tokenizer.eos_token!r}, "
            f"expected {STOP_TOKENS[family][0]!r}"
        )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if ids[:2] != [vocab["[gMASK]"], vocab["<sop>"]]:
        raise TokenizerConversionError(
            f"chat template in {out_dir} does not start the prompt with [gMASK]<sop>: {prompt!r}"
        )
    pad = tokenizer.pad_token_id
    return TokenizerFamily(
        name=family,
        stop_token_ids=stop_ids,
        stop_tokens=STOP_TOKENS[family],
        eos_token_id=stop_ids[0],
        pad_token_id=stop_ids[0] if pad is None else pad,
        vocab_size=max(vocab.values()) + 1,
    )


def _has_role_tokens(src_dir: Path, config: dict[str, Any]) -> bool:
    """ChatGLM3 appends role tokens; ChatGLM2 does not. Files are read as text, never run."""
    tokenizer_config = _read_json(src_dir / "tokenizer_config.json", required=False)
    text = json.dumps(tokenizer_config, ensure_ascii=False)
    if "<|assistant|>" in text or "<|user|>" in text:  # template or added tokens
        return True
    names = " ".join(
        str(source.get(key, ""))
        for source in (config, tokenizer_config)
        for key in ("_name_or_path", "name_or_path")
    ).lower()
    if "chatglm3" in names:
        return True
    if "chatglm2" in names or "codegeex2" in names:
        return False
    code = src_dir / "tokenization_chatglm.py"
    if code.is_file():
        return b"<|observation|>" in code.read_bytes()
    raise TokenizerConversionError(
        f"{src_dir}: cannot tell ChatGLM2 from ChatGLM3 (no tokenization_chatglm.py, no role "
        f"tokens in tokenizer_config.json); copy the folder completely from its hub repository"
    )


def _context(src_dir: Path) -> int | None:
    config = _read_json(src_dir / "config.json")
    for key in ("seq_length", "max_position_embeddings"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def _read_json(path: Path, required: bool = True) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        if not required:
            return {}
        raise TokenizerConversionError(f"{path} is missing") from exc
    except (OSError, ValueError) as exc:
        raise TokenizerConversionError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerConversionError(f"{path} is not a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
