"""``chatglm`` checkpoint (ChatGLM2/3-6B, GLM-4-9B-chat) -> transformers-native ``glm`` folder.

The original checkpoints only run through their own ``modeling_chatglm.py``, code that came
with the weights; a hospital must never execute it. This module rewrites the weights into the
layout of ``GlmForCausalLM`` (the same network, as transformers itself ships it), so the usual
optimum-intel export applies. Nothing from the source folder is imported or run: config and
index are read as JSON, ``.bin`` shards with ``torch.load(weights_only=True)`` (no pickled
code), safetensors as data.

What changes between the two layouts, and why it is exact:

- ``query_key_value`` is one fused projection: all query heads, then the
  ``multi_query_group_num`` key heads, then as many value heads (``multi_query_attention``); it
  is split row-wise into ``q_proj``/``k_proj``/``v_proj``, biases alike (``add_qkv_bias``).
  Without multi-query attention the rows are interleaved per head as [q_h, k_h, v_h].
- Rotary: ChatGLM rotates the first ``kv_channels / 2`` dims of each head as interleaved pairs
  (2i, 2i+1), base ``10000 * rope_ratio``. ``GlmForCausalLM`` does the same with
  ``partial_rotary_factor=0.5``: its ``rotate_half`` is the interleaved form and its cos/sin are
  ``repeat_interleave``d, so no permutation of the q/k rows is needed.
- ``dense_h_to_4h`` already holds [gate; up] in the order ``GlmMLP.gate_up_proj`` chunks it.
- RMSNorm, the untied ``output_layer``, ``seq_length`` and ``padded_vocab_size`` map one to one.

Tensors are converted shard by shard (a 9B model never needs twice its size in memory) and
written as safetensors in the source dtype (bf16 or fp16).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medserve.models.layouts import LayoutError, chatglm_family, read_config

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# Buffers the original modules register; GlmForCausalLM recomputes them.
_DROPPED = ("transformer.rotary_pos_emb.inv_freq",)
_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}

Progress = Callable[[str], None]


class ChatGLMConversionError(LayoutError):
    """The checkpoint cannot be converted exactly; the message says which feature and why."""


@dataclass(frozen=True)
class AttentionShape:
    """Head geometry of the fused query_key_value projection."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    grouped: bool
    """True for multi-query (grouped) attention: [all q | all k | all v] rows."""

    def split_sizes(self) -> tuple[int, int, int]:
        kv = self.num_kv_heads * self.head_dim
        return self.num_heads * self.head_dim, kv, kv


def attention_shape(config: dict[str, Any]) -> AttentionShape:
    num_heads = int(config["num_attention_heads"])
    head_dim = int(config.get("kv_channels") or config["hidden_size"] // num_heads)
    grouped = bool(config.get("multi_query_attention", False))
    num_kv = int(config["multi_query_group_num"]) if grouped else num_heads
    if num_heads % num_kv:
        raise ChatGLMConversionError(f"{num_heads} heads do not split into {num_kv} KV groups")
    return AttentionShape(num_heads, num_kv, head_dim, grouped)


def glm_config(config: dict[str, Any], stop_ids: list[int], pad_id: int | None) -> dict[str, Any]:
    """config.json for ``GlmForCausalLM``, keyed as THUDM/glm-4-9b-chat-hf writes it."""
    _check_supported(config)
    shape = attention_shape(config)
    rope_ratio = float(config.get("rope_ratio") or 1.0)
    return {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "attention_bias": bool(config.get("add_qkv_bias", False)),
        "attention_dropout": 0.0,
        "eos_token_id": stop_ids,
        "pad_token_id": pad_id,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": int(config["hidden_size"]),
        "initializer_range": 0.02,
        "intermediate_size": int(config["ffn_hidden_size"]),
        "max_position_embeddings": int(config["seq_length"]),
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": int(config.get("num_layers") or config["num_hidden_layers"]),
        "num_key_value_heads": shape.num_kv_heads,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": float(config.get("layernorm_epsilon", 1e-5)),
        "rope_theta": 10000.0 * rope_ratio,
        "tie_word_embeddings": False,
        "torch_dtype": config.get("torch_dtype", "float16"),
        "use_cache": True,
        "vocab_size": int(config.get("padded_vocab_size") or config["vocab_size"]),
    }


def convert_tensor(name: str, tensor: Any, shape: AttentionShape) -> list[tuple[str, Any]]:
    """One source tensor -> its ``glm`` tensors (none for dropped buffers)."""
    if name in _DROPPED:
        return []
    if name in _GLOBAL_NAMES:
        return [(_GLOBAL_NAMES[name], tensor)]
    match = _LAYER.fullmatch(name)
    if match is None:
        raise ChatGLMConversionError(_unknown_tensor_message(name))
    prefix, leaf = f"model.layers.{match[1]}.", match[2]
    if leaf in _LAYER_NAMES:
        return [(prefix + _LAYER_NAMES[leaf], tensor)]
    if leaf in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        kind = leaf.rsplit(".", 1)[1]
        q, k, v = split_qkv(tensor, shape)
        parts = zip("qkv", (q, k, v), strict=True)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in parts]
    raise ChatGLMConversionError(_unknown_tensor_message(name))


def split_qkv(fused: Any, shape: AttentionShape) -> tuple[Any, Any, Any]:
    """Split a fused query_key_value weight [rows, hidden] or bias [rows] into q, k, v."""
    q_rows, k_rows, v_rows = shape.split_sizes()
    if fused.shape[0] != q_rows + k_rows + v_rows:
        raise ChatGLMConversionError(
            f"query_key_value has {fused.shape[0]} rows, the config implies "
            f"{q_rows + k_rows + v_rows} ({shape})"
        )
    if shape.grouped:
        q, k, v = fused.split([q_rows, k_rows, v_rows], dim=0)
    else:
        per_head = fused.reshape(shape.num_heads, 3, shape.head_dim, *fused.shape[1:])
        q, k, v = (per_head[:, i].reshape(-1, *fused.shape[1:]) for i in range(3))
    return q.contiguous(), k.contiguous(), v.contiguous()


def source_weight_files(src_dir: Path) -> list[Path]:
    """The checkpoint's weight files in index order (safetensors preferred over .bin)."""
    src_dir = Path(src_dir)
    for index_name in INDEX_FILES:
        index_path = src_dir / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (src_dir / n).is_file()]
            if missing:
                raise ChatGLMConversionError(
                    f"{index_path} lists {', '.join(missing)}, which {src_dir} lacks "
                    f"(an incomplete download?)"
                )
            return [src_dir / n for n in names]
    for single in SINGLE_FILES:
        if (src_dir / single).is_file():
            return [src_dir / single]
    raise ChatGLMConversionError(f"{src_dir} has no weights ({', '.join(INDEX_FILES)} or files)")


def iter_tensors(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of one shard, read as data only: never unpickles code."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                yield name, shard.get_tensor(name)
        return
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    yield from state.items()


def convert_chatglm_checkpoint(
    src_dir: Path, out_dir: Path, *, progress: Progress | None = None
) -> Path:
    """Write the ``glm`` form of the ``chatglm`` checkpoint ``src_dir`` into ``out_dir``.

    ``out_dir`` receives config.json, generation_config.json (the family's stop ids, as
    ``convert_chatglm_tokenizer`` reports them: ``</s>``/``<|endoftext|>``, ``<|user|>``,
    ``<|observation|>``), safetensors shards with their index, and the tokenizer files
    (tokenizer.json + chat template).
    """
    from medserve.models.chatglm_tokenizer import convert_chatglm_tokenizer
    from safetensors.torch import save_file

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    say = progress or (lambda _text: None)
    config = read_config(src_dir)
    if config["model_type"] != "chatglm":
        raise ChatGLMConversionError(f"{src_dir} is model_type {config['model_type']!r}")
    family = chatglm_family(config, src_dir)
    _check_supported(config)
    shape = attention_shape(config)
    files = source_weight_files(src_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    say(f"{family}: converting the tokenizer")
    tokenizer = convert_chatglm_tokenizer(src_dir, out_dir)
    stop_ids, pad_id = [int(i) for i in tokenizer.stop_token_ids], int(tokenizer.pad_token_id)
    vocab = int(config.get("padded_vocab_size") or config["vocab_size"])
    if tokenizer.vocab_size > vocab:
        raise ChatGLMConversionError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the weights only {vocab} rows"
        )

    weight_map: dict[str, str] = {}
    total_bytes = 0
    for number, path in enumerate(files, start=1):
        say(f"{family}: converting weights {number}/{len(files)} ({path.name})")
        out_name = f"model-{number:05d}-of-{len(files):05d}.safetensors"
        tensors: dict[str, Any] = {}
        for name, tensor in iter_tensors(path):
            for new_name, new_tensor in convert_tensor(name, tensor, shape):
                tensors[new_name] = new_tensor.contiguous()
        if tensors:
            save_file(tensors, str(out_dir / out_name), metadata={"format": "pt"})
            total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, out_name))
        del tensors
    _check_complete(weight_map, config)
    weight_map = dict(sorted(weight_map.items()))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    _write_json(out_dir / "model.safetensors.index.json", index)
    _write_json(out_dir / "config.json", glm_config(config, stop_ids, pad_id))
    generation = {"eos_token_id": stop_ids, "pad_token_id": pad_id}
    _write_json(out_dir / "generation_config.json", generation)
    return out_dir


def default_progress(text: str) -> None:
    print(f"[medserve export] {text}", file=sys.stderr, flush=True)


def _check_supported(config: dict[str, Any]) -> None:
    """Refuse, naming the key, every variant GlmForCausalLM cannot reproduce exactly."""
    problems = []
    if not config.get("rmsnorm", True):
        problems.append("rmsnorm=false (LayerNorm blocks)")
    if not config.get("post_layer_norm", True):
        problems.append("post_layer_norm=false (no final norm)")
    if config.get("apply_residual_connection_post_layernorm", False):
        problems.append("apply_residual_connection_post_layernorm=true")
    if config.get("add_bias_linear", False):
        problems.append("add_bias_linear=true (biases on dense/MLP layers)")
    if config.get("quantization_bit"):
        problems.append(
            f"quantization_bit={config['quantization_bit']} (a pre-quantized checkpoint: "
            f"export the full-precision one and let medserve quantize it)"
        )
    if config.get("pre_seq_len"):
        problems.append("pre_seq_len (a P-tuning prefix encoder)")
    if problems:
        raise ChatGLMConversionError(
            "this chatglm checkpoint has no exact GlmForCausalLM equivalent: " + "; ".join(problems)
        )


def _check_complete(weight_map: dict[str, str], config: dict[str, Any]) -> None:
    layers = int(config.get("num_layers") or config["num_hidden_layers"])
    per_layer = [*_LAYER_NAMES.values(), "self_attn.q_proj.weight"]
    expected = {*_GLOBAL_NAMES.values()}
    expected |= {f"model.layers.{i}.{leaf}" for i in range(layers) for leaf in per_layer}
    missing = sorted(expected - weight_map.keys())
    if missing:
        raise ChatGLMConversionError(
            f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}"
        )


def _unknown_tensor_message(name: str) -> str:
    return (
        f"unexpected tensor {name!r}: not part of the ChatGLM2/3 / GLM-4 chatglm layout "
        f"(a quantized, P-tuned or modified checkpoint?)"
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
