"""ipex-llm engine: serves a low-bit folder written by ``medserve quantize --engine ipex-llm``.

Runs only in ``.venv-ipex-llm`` (torch 2.13 CPU, transformers 4.47.1, ipex-llm 2.2.0), in its
own worker process: ipex-llm pins a transformers that cannot live beside OpenVINO's, and the
project is archived upstream with known security issues, so it never shares a process with
the server. The folder is loaded with ``load_low_bit`` (the already-quantized weights, never
the original checkpoint; no code from the folder is run). Its speed on CPU comes from
LowBitLinear's ggml kernels; the rest is eager PyTorch. Scheduling, KV ownership and sampling
are those of every PyTorch engine (accel/torch_engine.py).
"""

from __future__ import annotations

import json

from medserve.accel.engine_core import served_manifest
from medserve.accel.protocol import Configure
from medserve.accel.torch_engine import (
    SteppedCausalLM,
    TorchModel,
    kv_bytes_per_token,
    set_threads,
    stop_token_ids,
)

ENGINE = "ipex-llm"
FORMAT = "ipex-llm-low-bit"


def load(config: Configure) -> SteppedCausalLM:
    model_dir, manifest = served_manifest(config, FORMAT)
    set_threads(config.options)

    from importlib.metadata import version

    import torch
    from ipex_llm.transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.load_low_bit(str(model_dir), trust_remote_code=False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(
        str(model_dir), trust_remote_code=False, local_files_only=True
    )
    generation = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
    # Activations and KV run in the folder's torch_dtype: bf16 for a bf16 folder, else fp32.
    hf_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    kv_dtype = getattr(torch, str(hf_config.get("torch_dtype") or "float32"), torch.float32)
    loaded = TorchModel(
        model=model,
        tokenizer=tokenizer,
        stop_token_ids=stop_token_ids(generation.eos_token_id, tokenizer),
        kv_bytes_per_token=kv_bytes_per_token(model_dir, kv_dtype),
        engine=ENGINE,
        extra_stats={"low_bit": manifest.precision, "ipex_llm": version("ipex-llm")},
    )
    return SteppedCausalLM(loaded, manifest, config)
