"""Tiny random GLM-family checkpoints laid out exactly as their hub repositories are.

Each one copies the real repository's file set, config.json keys, tensor names, shard naming,
index json, dtypes and tokenizer files (from ``write_tiny_tokenizer_files``), with tiny sizes
(hidden 64, 2 layers) so an export takes seconds:

==================  ==========  ===============================  =================================
name                model_type  as                               weights
==================  ==========  ===============================  =================================
tiny-chatglm2       chatglm     THUDM/chatglm2-6b                pytorch_model-*.bin, fp16
tiny-chatglm3       chatglm     THUDM/chatglm3-6b                model-*.safetensors, fp16
tiny-glm4-chatglm   chatglm     THUDM/glm-4-9b-chat              model-*.safetensors, bf16
tiny-glm4-hf        glm         THUDM/glm-4-9b-chat-hf           model-*.safetensors, bf16
tiny-glm4-0414      glm4        THUDM/GLM-4-9B-0414              model-*.safetensors, bf16
==================  ==========  ===============================  =================================

The ``chatglm`` folders carry stand-ins for ``modeling_chatglm.py`` and
``configuration_chatglm.py`` that write ``REMOTE_CODE_RAN`` beside themselves when imported:
the tests prove no export ever runs code that came with the weights.

Weights come from numpy's PCG64 with a fixed seed per tensor, so they are the same on every
machine and torch version (the reference fixtures in tests/data/chatglm depend on them).
Their scale is chosen so that greedy decoding has clear margins between the top two logits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from medserve.models.tiny_chatglm_tokenizers import tiny_vocab_size, write_tiny_tokenizer_files

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
FFN = 128
LAYERS = 2
CONTEXT_LENGTH = 2048
REMOTE_CODE_MARKER = "REMOTE_CODE_RAN"
# What a checkpoint's own .py files would do if anything ever imported them.
_REMOTE_CODE_STAND_IN = f'''"""Stand-in for upstream remote code: if this ran, remote code ran."""
from pathlib import Path

Path(__file__).with_name("{REMOTE_CODE_MARKER}").write_text(__name__)
raise RuntimeError("remote code from a model folder was executed")
'''
_CHATGLM_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}


@dataclass(frozen=True)
class TinySpec:
    """One tiny checkpoint: which real repository it mimics and how that one is stored."""

    name: str
    layout: str
    """config.json model_type: chatglm, glm or glm4."""
    tokenizer_family: str
    """Family name for ``write_tiny_tokenizer_files``."""
    vocab_size: int
    """padded_vocab_size / vocab_size: the embedding rows (>= the tokenizer's size)."""
    dtype: str
    """torch_dtype as the real repository stores its weights."""
    weight_format: str
    """"bin" (pytorch_model-*.bin) or "safetensors" (model-*.safetensors)."""
    config_extra: dict[str, Any] = field(default_factory=dict)


# Embedding rows per tiny family: above the tiny tokenizers' sizes (as the real padded
# vocabularies are), and fixed, so that the weights (and the reference fixtures) do not move
# when a tiny tokenizer changes size.
_CHATGLM_ROWS = 640
_GLM4_ROWS = 512


SPECS = {
    spec.name: spec
    for spec in (
        TinySpec(
            "tiny-chatglm2",
            "chatglm",
            "chatglm2",
            _CHATGLM_ROWS,
            "float16",
            "bin",
            {"transformers_version": "4.27.1"},
        ),
        TinySpec(
            "tiny-chatglm3",
            "chatglm",
            "chatglm3",
            _CHATGLM_ROWS,
            "float16",
            "safetensors",
            {"transformers_version": "4.30.2"},
        ),
        TinySpec(
            "tiny-glm4-chatglm",
            "chatglm",
            "glm4-chatglm",
            _GLM4_ROWS,
            "bfloat16",
            "safetensors",
            {
                "attn_implementation": "sdpa",
                "num_hidden_layers": LAYERS,
                "rope_ratio": 500,
                "transformers_version": "4.44.0",
            },
        ),
        TinySpec("tiny-glm4-hf", "glm", "glm4-hf", _GLM4_ROWS, "bfloat16", "safetensors"),
        TinySpec("tiny-glm4-0414", "glm4", "glm4-0414", _GLM4_ROWS, "bfloat16", "safetensors"),
    )
}


def build_tiny_checkpoint(name: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Write the tiny checkpoint ``name`` (a key of ``SPECS``) into ``out_dir``."""
    spec = SPECS[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer_files(out_dir, spec.tokenizer_family)
    specials = _special_token_ids(out_dir)
    _write_json(out_dir / "config.json", _config(spec, specials))
    _write_json(out_dir / "generation_config.json", _generation_config(spec, specials))
    _write_weights(spec, out_dir, seed)
    if spec.layout == "chatglm":
        for stand_in in ("modeling_chatglm.py", "configuration_chatglm.py"):
            (out_dir / stand_in).write_text(_REMOTE_CODE_STAND_IN, encoding="utf-8")
    return out_dir


def tensor_shapes(spec: TinySpec) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order the real checkpoint's index lists its shards."""
    if spec.layout == "chatglm":
        return list(_chatglm_tensors(spec.vocab_size))
    return list(_native_tensors(spec.vocab_size, with_post_norms=spec.layout == "glm4"))


def _chatglm_tensors(vocab: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    qkv_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    yield "transformer.embedding.word_embeddings.weight", (vocab, HIDDEN)
    yield "transformer.rotary_pos_emb.inv_freq", (HEAD_DIM // 4,)
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        yield p + "input_layernorm.weight", (HIDDEN,)
        yield p + "self_attention.query_key_value.weight", (qkv_rows, HIDDEN)
        yield p + "self_attention.query_key_value.bias", (qkv_rows,)
        yield p + "self_attention.dense.weight", (HIDDEN, HEADS * HEAD_DIM)
        yield p + "post_attention_layernorm.weight", (HIDDEN,)
        yield p + "mlp.dense_h_to_4h.weight", (2 * FFN, HIDDEN)
        yield p + "mlp.dense_4h_to_h.weight", (HIDDEN, FFN)
    yield "transformer.encoder.final_layernorm.weight", (HIDDEN,)
    yield "transformer.output_layer.weight", (vocab, HIDDEN)


def _native_tensors(vocab: int, *, with_post_norms: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield "model.embed_tokens.weight", (vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (HIDDEN,)
        yield p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)
        yield p + "self_attn.q_proj.bias", (HEADS * HEAD_DIM,)
        yield p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)
        yield p + "self_attn.k_proj.bias", (KV_HEADS * HEAD_DIM,)
        yield p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)
        yield p + "self_attn.v_proj.bias", (KV_HEADS * HEAD_DIM,)
        yield p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)
        yield p + "post_attention_layernorm.weight", (HIDDEN,)
        if with_post_norms:
            yield p + "post_self_attn_layernorm.weight", (HIDDEN,)
            yield p + "post_mlp_layernorm.weight", (HIDDEN,)
        yield p + "mlp.gate_up_proj.weight", (2 * FFN, HIDDEN)
        yield p + "mlp.down_proj.weight", (HIDDEN, FFN)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (vocab, HIDDEN)


def _random_tensor(name: str, shape: tuple[int, ...], stream: list[int]) -> np.ndarray:
    """float32 values for one tensor, from its own PCG64 stream (order-independent)."""
    if name.endswith("inv_freq"):  # a buffer with fixed content in the real checkpoints
        dim = 2 * shape[0]
        return (1.0 / 10000 ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)
    rng = np.random.Generator(np.random.PCG64(stream))
    if "norm" in name:
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)
    if "embed" in name:
        return rng.standard_normal(shape).astype(np.float32)
    # Linear weights: std 1/sqrt(fan_in) keeps activations O(1); the output layer is scaled up
    # so that logits spread over several units and greedy picks are never near-ties.
    scale = 4.0 if name.endswith(("output_layer.weight", "lm_head.weight")) else 1.0
    return (scale * rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


def _write_weights(spec: TinySpec, out_dir: Path, seed: int) -> None:
    import torch

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[spec.dtype]
    shapes = tensor_shapes(spec)
    # Each checkpoint and tensor has its own stream: tiny-chatglm2 and -3 differ in weights.
    spec_key = sorted(SPECS).index(spec.name)
    live_rows = tiny_vocab_size(spec.tokenizer_family)
    if live_rows > spec.vocab_size:
        raise ValueError(f"{spec.name}: {live_rows} tokens, {spec.vocab_size} embedding rows")
    # Two shards, split like the real ones: embedding and first layer, then the rest.
    split = next(i for i, (n, _) in enumerate(shapes) if ".1." in n)
    shards = [shapes[:split], shapes[split:]]
    index = {name: i for i, (name, _) in enumerate(shapes)}
    weight_map: dict[str, str] = {}
    total = 0
    for number, shard in enumerate(shards, start=1):
        tensors = {}
        for name, shape in shard:
            values = _random_tensor(name, shape, [seed, spec_key, index[name]])
            if shape[0] == spec.vocab_size and len(shape) == 2:
                # Padding rows past the tokenizer: zero, so greedy never picks an id the
                # tokenizer cannot decode (the real models learnt never to).
                values[live_rows:] = 0.0
            tensors[name] = torch.from_numpy(values).to(dtype)
        if spec.weight_format == "bin":
            file_name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
            torch.save(tensors, out_dir / file_name)
        else:
            from safetensors.torch import save_file

            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index_name = (
        "pytorch_model.bin.index.json"
        if spec.weight_format == "bin"
        else "model.safetensors.index.json"
    )
    index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / index_name, index_data)


def weights_fingerprint(folder: Path) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) of a checkpoint folder.

    Reference fixtures record it: a changed tiny checkpoint is reported as such, instead of
    as a conversion that suddenly disagrees with the oracle.
    """
    import hashlib

    import torch
    from medserve.models.chatglm_convert import iter_tensors, source_weight_files

    digest = hashlib.sha256()
    tensors = {n: t for f in source_weight_files(folder) for n, t in iter_tensors(f)}
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _config(spec: TinySpec, specials: dict[str, int]) -> dict[str, Any]:
    if spec.layout == "chatglm":
        return _chatglm_config(spec, specials)
    stop = _glm4_stop_ids(specials)
    config: dict[str, Any] = {
        "architectures": ["GlmForCausalLM" if spec.layout == "glm" else "Glm4ForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": stop,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "max_position_embeddings": CONTEXT_LENGTH,
        "model_type": spec.layout,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pad_token_id": stop[0],
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1.5625e-07 if spec.layout == "glm" else 1e-05,
        "rope_theta": 5000000.0 if spec.layout == "glm" else 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": spec.dtype,
        "transformers_version": "4.46.0.dev0" if spec.layout == "glm" else "4.52.0.dev0",
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }
    return config


def _chatglm_config(spec: TinySpec, specials: dict[str, int]) -> dict[str, Any]:
    glm4 = spec.tokenizer_family == "glm4-chatglm"
    name_or_path = {
        "chatglm2": "THUDM/chatglm2-6b",
        "chatglm3": "THUDM/chatglm3-6b",
        "glm4-chatglm": "THUDM/glm-4-9b-chat",
    }[spec.tokenizer_family]
    config: dict[str, Any] = {
        "_name_or_path": name_or_path,
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": dict(_CHATGLM_AUTO_MAP),
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": FFN,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": HIDDEN,
        "kv_channels": HEAD_DIM,
        "layernorm_epsilon": 1.5625e-07 if glm4 else 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": KV_HEADS,
        "num_attention_heads": HEADS,
        "num_layers": LAYERS,
        "original_rope": True,
        "padded_vocab_size": spec.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": CONTEXT_LENGTH,
        "use_cache": True,
        "torch_dtype": spec.dtype,
        "tie_word_embeddings": False,
        **spec.config_extra,
    }
    if glm4:
        stop = _glm4_stop_ids(specials)
        config.update(eos_token_id=stop, pad_token_id=stop[0])
    else:
        # ChatGLM2/3: SentencePiece </s> is id 2 and <unk> (their pad) id 0, as in the real ones.
        config.update(eos_token_id=specials.get("</s>", 2), pad_token_id=0)
    return dict(sorted(config.items())) if glm4 else config


def _generation_config(spec: TinySpec, specials: dict[str, int]) -> dict[str, Any]:
    if spec.tokenizer_family in ("chatglm2", "chatglm3"):
        return {"_from_model_config": True, "eos_token_id": 2, "pad_token_id": 0}
    stop = _glm4_stop_ids(specials)
    return {
        "eos_token_id": stop,
        "pad_token_id": stop[0],
        "do_sample": True,
        "temperature": 0.8,
        "max_length": CONTEXT_LENGTH,
        "top_p": 0.8,
    }


def _glm4_stop_ids(specials: dict[str, int]) -> list[int]:
    return [specials[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]


def _special_token_ids(folder: Path) -> dict[str, int]:
    """Special-token ids from the tiny tokenizer files (tokenizer.json or tokenizer_config)."""
    ids: dict[str, int] = {}
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        ids.update({t["content"]: int(t["id"]) for t in data.get("added_tokens", [])})
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        data = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = data.get("added_tokens_decoder", {})
        ids.update({v["content"]: int(k) for k, v in decoder.items()})
    return ids


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
