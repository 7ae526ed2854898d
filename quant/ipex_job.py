"""The part of ``medserve quantize --engine ipex`` that runs inside .venv-ipex.

    python -m medserve.quant.ipex_job --job JOB.json --result RESULT.json

IPEX serves unquantized weights (its weight-only quantization is ~30x slower than bf16 on a
CPU without AVX512-FP16), so "quantizing" for it means: the HF folder cast to bf16 or fp32 and
saved as safetensors with a transformers-4.47 tokenizer (chat template inside) and the
source's generation config; then reloaded through ``ipex.llm.optimize`` exactly as the engine
does, and its perplexity measured (the reference's too when that is an HF folder).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

from medserve.quant.engine_job import Job, Result, main, say, tokenizer_samples, versions


def run(job: Job) -> Result:
    import torch
    from medserve.accel.ipex_engine import PRECISIONS, empty_cache, load_optimized
    from medserve.quant.accuracy import EVAL_TEXTS
    from medserve.quant.torch_perplexity import hf_perplexity, torch_perplexity
    from medserve.quant.transformers4 import (
        check_tokenizer,
        load_config,
        load_generation_config,
        load_tokenizer,
        save_tokenizer,
    )
    from transformers import AutoModelForCausalLM

    hf_dir, out_dir = Path(job.hf_dir), Path(job.out_dir)
    if job.precision not in PRECISIONS:
        raise ValueError(f"precision={job.precision!r}: IPEX serves {', '.join(PRECISIONS)}")
    config = load_config(hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    check_tokenizer(tokenizer, hf_dir, tokenizer_samples())
    dtype = torch.bfloat16 if job.precision == "bf16" else torch.float32
    say(f"writing {hf_dir} as {job.precision} safetensors ...")
    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), config=config, torch_dtype=dtype, trust_remote_code=False,
        local_files_only=True,
    )  # fmt: skip
    generation = load_generation_config(hf_dir)
    if generation is not None:
        model.generation_config = generation
    model.save_pretrained(str(out_dir), safe_serialization=True)
    del model
    gc.collect()
    save_tokenizer(tokenizer, out_dir, tokenizer_samples())

    say("reloading through ipex.llm.optimize, as the server does, to measure it ...")
    optimized = load_optimized(out_dir, job.precision)
    layers = int(config.num_hidden_layers)

    def ipex_inputs(length: int) -> dict[str, Any]:
        return {
            "past_key_values": empty_cache(layers, dtype),
            "attention_mask": torch.ones(1, length, dtype=torch.long),
        }

    with torch.autocast("cpu", enabled=job.precision == "bf16", dtype=torch.bfloat16):
        perplexity = torch_perplexity(optimized, tokenizer, EVAL_TEXTS, extra_inputs=ipex_inputs)
    del optimized
    gc.collect()
    say(f"perplexity {perplexity:.3f}")
    reference_ppl = None
    if job.reference is not None:
        if job.reference_kind != "hf":
            raise ValueError("an IPEX build is gated on an HF or OpenVINO reference folder")
        say(f"perplexity of the reference {job.reference} ...")
        reference_ppl = hf_perplexity(Path(job.reference))
    return Result(
        perplexity=perplexity,
        reference_perplexity=reference_ppl,
        architecture=str(config.model_type),
        versions=versions("intel-extension-for-pytorch", "torch", "transformers"),
    )


if __name__ == "__main__":
    sys.exit(main(run))
