"""The part of ``medserve quantize --engine ipex-llm`` that runs inside .venv-ipex-llm.

    python -m medserve.quant.ipex_llm_job --job JOB.json --result RESULT.json

Quantize the HF folder with ipex-llm (``from_pretrained(load_in_low_bit=...)``),
``save_low_bit`` it with a transformers-4.47 tokenizer (chat template inside) and the source's
generation config, reload it with ``load_low_bit`` exactly as the server will (so what is
measured is what is served, and loading provably needs no original weights), and measure its
perplexity, and the reference's when the reference is a PyTorch folder. The command
(quant/quantize.py) owns the staging folder and writes the manifest.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any

from medserve.quant.engine_job import Job, Result, main, say, tokenizer_samples, versions

LOW_BITS = ("sym_int4", "asym_int4", "sym_int8", "bf16")


def run(job: Job) -> Result:
    from medserve.quant.torch_perplexity import hf_perplexity
    from medserve.quant.transformers4 import (
        check_tokenizer,
        load_config,
        load_tokenizer,
        save_tokenizer,
    )

    hf_dir, out_dir = Path(job.hf_dir), Path(job.out_dir)
    if job.precision not in LOW_BITS:
        raise ValueError(f"low_bit={job.precision!r}: use one of {', '.join(LOW_BITS)}")
    config = load_config(hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    check_tokenizer(tokenizer, hf_dir, tokenizer_samples())
    say(f"quantizing {hf_dir} to {job.precision} with ipex-llm ...")
    _quantize(hf_dir, out_dir, job.precision, config)
    save_tokenizer(tokenizer, out_dir, tokenizer_samples())

    say("reloading with load_low_bit, as the server does, to measure it ...")
    perplexity = low_bit_perplexity(out_dir, tokenizer)
    say(f"perplexity {perplexity:.3f}")
    reference_ppl = None
    if job.reference is not None:
        say(f"perplexity of the reference {job.reference} ...")
        reference = Path(job.reference)
        if job.reference_kind == "ipex-llm":
            reference_ppl = low_bit_perplexity(reference, _saved_tokenizer(reference))
        elif job.reference_kind == "hf":
            reference_ppl = hf_perplexity(reference)
        else:
            raise ValueError(f"reference_kind={job.reference_kind!r}: use 'ipex-llm' or 'hf'")
    return Result(
        perplexity=perplexity,
        reference_perplexity=reference_ppl,
        architecture=str(config.model_type),
        versions=versions("ipex-llm", "torch", "transformers"),
    )


def _quantize(hf_dir: Path, out_dir: Path, low_bit: str, config: Any) -> None:
    import torch
    from ipex_llm.transformers import AutoModelForCausalLM
    from medserve.quant.transformers4 import load_generation_config

    # bf16 keeps bf16 activations (and KV); the integer formats compute in fp32 on CPU.
    dtype = torch.bfloat16 if low_bit == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir),
        config=config,
        load_in_low_bit=low_bit,
        optimize_model=True,
        torch_dtype=dtype,
        trust_remote_code=False,
        local_files_only=True,
    )
    generation = load_generation_config(hf_dir)
    if generation is not None:
        model.generation_config = generation
    model.save_low_bit(str(out_dir))
    del model
    gc.collect()


def low_bit_perplexity(model_dir: Path, tokenizer: Any) -> float:
    """Perplexity of a low-bit folder, loaded with load_low_bit as the engine loads it."""
    from ipex_llm.transformers import AutoModelForCausalLM
    from medserve.quant.accuracy import EVAL_TEXTS
    from medserve.quant.torch_perplexity import torch_perplexity

    # Perplexity needs every position's logits; ipex-llm's lm_head otherwise computes only
    # the last one on a prefill (read when the modules are built, so set before loading).
    os.environ["IPEX_LLM_LAST_LM_HEAD"] = "0"
    model = AutoModelForCausalLM.load_low_bit(str(model_dir), trust_remote_code=False)
    model.eval()
    try:
        return torch_perplexity(model, tokenizer, EVAL_TEXTS)
    finally:
        del model
        gc.collect()


def _saved_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(model_dir), trust_remote_code=False, local_files_only=True
    )


if __name__ == "__main__":
    sys.exit(main(run))
