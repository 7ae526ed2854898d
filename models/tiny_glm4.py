"""A tiny random-weight GLM-4 model for tests: built offline in seconds, served like a real one.

It exercises the ``glm4`` architecture and the GLM-4 chat format
(``[gMASK]<sop><|user|>\\n...<|assistant|>``) through the same export and OpenVINO GenAI path
as the bundled model.  Its output is random tokens.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from medserve.quant.export import (
    export_openvino,
    is_valid_model_dir,
    read_manifest,
    staged_dir,
    verify_ov_tokenizer,
    write_manifest,
)

NAME = "tiny-glm4"
CONTEXT_LENGTH = 2048
EOS = "<|endoftext|>"
# GLM-4's special tokens; generation stops on <|endoftext|>, <|user|> and <|observation|>.
SPECIAL_TOKENS = (
    EOS,
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
STOP_TOKENS = (EOS, "<|user|>", "<|observation|>")
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Enough text for a few hundred merges; the byte alphabet covers everything else.
CORPUS = (
    "The capital of France is Paris. The patient reports chest pain since yesterday.",
    "Take 2 tablets of 500 mg twice daily after meals; review in 14 days.",
    "Hello, world! How are you today? I am fine, thank you.",
    "患者主诉头痛三天，无发热。建议复查血常规。你好，世界。",
    "def dose(weight_kg: float) -> float:\n    return 0.5 * weight_kg\n",
)
ROUND_TRIP_SAMPLES = (
    "The capital of France is Paris.",
    "  two  spaces,\ttab,\n\nblank line and trailing space ",
    "患者主诉头痛 🙂 12.5 mg",
)
CHECK_MESSAGES = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
)


def glm4_prompt(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """What ``GLM4_CHAT_TEMPLATE`` must render: the reference for the checks."""
    turns = "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)
    return "[gMASK]<sop>" + turns + ("<|assistant|>" if add_generation_prompt else "")


def build_tiny_glm4(out_dir: Path, *, seed: int = 0) -> Path:
    """Build, export (OpenVINO IR fp32) and check the tiny model into ``out_dir``.

    Skips the work when ``out_dir`` already holds a valid build with the same seed.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir) or {}
    if is_valid_model_dir(out_dir) and manifest.get("source", {}).get("seed") == seed:
        return out_dir
    with staged_dir(out_dir) as stage, tempfile.TemporaryDirectory() as hf_tmp:
        hf_dir = Path(hf_tmp)
        _save_hf_model(hf_dir, seed)
        export_openvino(hf_dir, stage, "fp32", progress=False)
        verify_ov_tokenizer(
            stage,
            samples=ROUND_TRIP_SAMPLES,
            messages=CHECK_MESSAGES,
            expected_prompt=glm4_prompt(CHECK_MESSAGES),
        )
        write_manifest(
            stage,
            {
                "name": NAME,
                "architecture": "glm4",
                "precision": "fp32",
                "source": {"generator": __name__, "seed": seed},
                "context_length": CONTEXT_LENGTH,
            },
        )
    return out_dir


def _save_hf_model(hf_dir: Path, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Glm4Config, Glm4ForCausalLM, PreTrainedTokenizerFast

    # Byte-level BPE trained on a fixed corpus: deterministic, offline, and it converts to
    # OpenVINO tokenizer IRs like GLM-4's own (also byte-level BPE).
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=CONTEXT_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = GLM4_CHAT_TEMPLATE

    stop_ids = [tokenizer.token_to_id(t) for t in STOP_TOKENS]
    config = Glm4Config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=CONTEXT_LENGTH,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=stop_ids,
        pad_token_id=stop_ids[0],
    )
    torch.manual_seed(seed)
    model = Glm4ForCausalLM(config).eval()
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = stop_ids[0]
    model.save_pretrained(hf_dir, safe_serialization=True)
    fast.save_pretrained(hf_dir)
