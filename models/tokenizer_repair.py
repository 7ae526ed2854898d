"""Repair the SmolLM2 tokenizer that transformers derives from the GGUF, and verify it.

What transformers 5.5 saves from ``SmolLM2-135M-Instruct.Q4_1.gguf`` (tokenizer.ggml.model
"gpt2", pre "smollm") is a ``CodeLlamaTokenizer``:

* eos_token is ``<|im_start|>`` (the GGUF's BOS), so generation never stops at ``<|im_end|>``;
* every encoding starts with a spurious BOS ``<|im_start|>`` (TemplateProcessing);
* five CodeLlama infill tokens (``▁<PRE>`` ... ``<FILL_ME>``) get ids 49152-49156, past the
  model's 49152-row embedding;
* on reload the class rebuilds a SentencePiece pipeline (Metaspace + byte fallback) over the
  byte-level BPE vocab: every space becomes ``<|endoftext|>`` (unk) and decode drops them.

The repair rebuilds the tokenizer from the saved vocab and merges the way the upstream SmolLM2
tokenizer is defined (byte-level BPE, single digits, no post-processor specials) and saves it as
a plain ``tokenizers`` backend, which reloads exactly as saved.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

BOS, EOS, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CONTEXT_LENGTH = 8192
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# The upstream SmolLM2-Instruct template (also the GGUF's): ChatML with a default system turn.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Spaces (leading, doubled, trailing), newlines, tabs, digits, accents, CJK, emoji, and tokens
# that look special but are plain text.
ROUND_TRIP_SAMPLES = (
    "The capital of France is Paris.",
    "  two  spaces,\ttab,\n\nblank line and trailing space ",
    " leading space\n  indented line\n",
    "Dose: 12.5 mg/kg, 3x daily (max 4000 mg).",
    "café naïve — 你好，世界 🙂",
    "<im_start> is not <|im_start|",
)
CHECK_MESSAGES = ({"role": "user", "content": "What is the capital of France?"},)


class TokenizerRepairError(RuntimeError):
    """The tokenizer in an HF folder fails a check the server relies on."""


def chatml_prompt(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """What ``SMOLLM2_CHAT_TEMPLATE`` must render: the reference for the checks."""
    parts = []
    if messages and messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def repair_smollm2_tokenizer(hf_dir: Path) -> None:
    """Rewrite the tokenizer files and the special-token ids of ``hf_dir`` in place."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    hf_dir = Path(hf_dir)
    saved = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = saved["model"]["vocab"]
    merges = [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in saved["model"]["merges"]
    ]
    # No unk and no byte fallback: a byte-level vocab covers every byte, and the <0xNN>
    # fallback tokens do not exist in it.
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    # llama.cpp's "smollm" pre-tokenizer: every digit alone, then the GPT-2 byte-level regex.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no BOS
    tokenizer.decoder = decoders.ByteLevel()
    # Keep the real special tokens (<|endoftext|>, <|im_start|>, ...), drop the CodeLlama
    # infill tokens that sit outside the vocab.
    specials = [t["content"] for t in saved.get("added_tokens", []) if t["id"] < len(vocab)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        model_max_length=CONTEXT_LENGTH,
        # True would turn "a ." into "a." on decode: no exact round trip.
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = SMOLLM2_CHAT_TEMPLATE
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "tokenizer.model",
        "added_tokens.json",
    ):
        (hf_dir / name).unlink(missing_ok=True)
    fast.save_pretrained(hf_dir)

    ids = {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]}
    for name in ("config.json", "generation_config.json"):
        path = hf_dir / name
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        data.update(ids)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def verify_smollm2_tokenizer(hf_dir: Path) -> None:
    """Raise ``TokenizerRepairError`` naming the first check that fails in ``hf_dir``."""
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    except Exception as exc:  # any load failure means the folder is not usable
        raise TokenizerRepairError(f"cannot load the tokenizer in {hf_dir}: {exc}") from exc

    def fail(problem: str) -> TokenizerRepairError:
        return TokenizerRepairError(f"tokenizer in {hf_dir}: {problem}")

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    if tokenizer.eos_token != EOS or tokenizer.eos_token_id != eos_id:
        raise fail(f"eos_token is {tokenizer.eos_token!r}, expected {EOS!r}")
    generation = json.loads((hf_dir / "generation_config.json").read_text(encoding="utf-8"))
    eos_ids = generation.get("eos_token_id")
    if eos_id not in (eos_ids if isinstance(eos_ids, list) else [eos_ids]):
        raise fail(f"generation_config eos_token_id is {eos_ids!r}, expected {eos_id}")
    vocab_size = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    if len(tokenizer) > vocab_size:
        raise fail(f"{len(tokenizer)} tokens but the model embeds only {vocab_size}")
    for text in ROUND_TRIP_SAMPLES:
        with_specials = tokenizer(text)["input_ids"]
        if with_specials != tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise fail(f"encoding {text!r} adds special tokens (spurious BOS?): {with_specials}")
        decoded = tokenizer.decode(with_specials)
        if decoded != text:
            raise fail(f"{text!r} does not round-trip: decodes to {decoded!r}")
    for messages in (
        list(CHECK_MESSAGES),
        [{"role": "system", "content": "Be brief."}, *CHECK_MESSAGES],
    ):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if prompt != chatml_prompt(messages):
            raise fail(f"chat template renders {prompt!r}, expected {chatml_prompt(messages)!r}")
