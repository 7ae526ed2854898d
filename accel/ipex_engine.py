"""IPEX engine: an unquantized HF folder (bf16 or fp32) run through ``ipex.llm.optimize``.

Runs only in ``.venv-ipex`` (intel-extension-for-pytorch 2.8.0 with torch 2.8, transformers
4.47.1), in its own worker process: IPEX is end-of-life upstream and imports only beside the
torch it was built for, whose PyPI Linux build is the CUDA one (it runs here on the CPU).
``llm.optimize`` swaps in fused RoPE / RMSNorm / attention and an indirect-access KV cache:
a tuple per layer that the model must be handed, empty, on a request's first forward, and an
attention mask on every forward. Scheduling, KV ownership and sampling are those of every
PyTorch engine (accel/torch_engine.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medserve.accel.engine_core import served_manifest
from medserve.accel.protocol import Configure
from medserve.accel.torch_engine import (
    SteppedCausalLM,
    TorchModel,
    kv_bytes_per_token,
    set_threads,
    stop_token_ids,
)

ENGINE = "ipex"
FORMAT = "hf"
PRECISIONS = ("bf16", "fp32")
BEAM_INDEX_TOKENS = 2048
"""Rows of the beam-index buffer of a fresh cache at least (IPEX's own generate() uses 2048);
one per token, so it is sized to the context the engine enforces when that is longer."""


def load_optimized(model_dir: Path, precision: str) -> Any:
    """The folder's model, IPEX-optimized for CPU inference at ``precision``."""
    import intel_extension_for_pytorch as ipex
    import torch
    from transformers import AutoModelForCausalLM

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: IPEX serves {', '.join(PRECISIONS)}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), torch_dtype=dtype, trust_remote_code=False, local_files_only=True
    ).eval()
    # deployment_mode=False: no TorchScript trace, whose fixed example shapes a server's
    # varying prompt lengths would keep re-tracing.
    return ipex.llm.optimize(model, dtype=dtype, inplace=True, deployment_mode=False)


def empty_cache(num_layers: int, dtype: Any, rows: int = BEAM_INDEX_TOKENS) -> tuple[Any, ...]:
    """What IPEX's generate() hands the model first: per layer (length, K, V, beam index)."""
    import torch

    return tuple(
        (
            torch.zeros(1, 0, 0, 1, dtype=torch.long).contiguous(),
            torch.zeros([1, 1, 1, 1], dtype=dtype).contiguous(),
            torch.zeros([1, 1, 1, 1], dtype=dtype).contiguous(),
            torch.zeros((rows, 1), dtype=torch.long).contiguous(),
        )
        for _ in range(num_layers)
    )


def load(config: Configure) -> SteppedCausalLM:
    model_dir, manifest = served_manifest(config, FORMAT)
    set_threads(config.options)

    from importlib.metadata import version

    import torch
    from transformers import AutoTokenizer, GenerationConfig

    model = load_optimized(model_dir, manifest.precision)
    tokenizer = AutoTokenizer.from_pretrained(
        str(model_dir), trust_remote_code=False, local_files_only=True
    )
    generation = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
    dtype = torch.bfloat16 if manifest.precision == "bf16" else torch.float32
    layers = int(model.config.num_hidden_layers)
    context = min(manifest.context_length or config.max_context_tokens, config.max_context_tokens)
    rows = max(BEAM_INDEX_TOKENS, context + 1)
    loaded = TorchModel(
        model=model,
        tokenizer=tokenizer,
        stop_token_ids=stop_token_ids(generation.eos_token_id, tokenizer),
        kv_bytes_per_token=kv_bytes_per_token(model_dir, dtype),
        engine=ENGINE,
        extra_stats={"ipex": version("intel-extension-for-pytorch")},
        new_cache=lambda: empty_cache(layers, dtype, rows),
        attention_mask=True,
    )
    return SteppedCausalLM(loaded, manifest, config)
