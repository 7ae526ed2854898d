"""GGUF file -> Hugging Face model folder (safetensors), through transformers' GGUF loader.

The tokenizer transformers derives from GGUF metadata is not usable as saved: repair it with
``medserve.models.tokenizer_repair`` before exporting.
"""

from __future__ import annotations

from pathlib import Path


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize ``gguf_path`` into ``out_dir`` (config, float32 safetensors, tokenizer).

    float32 rather than bf16: the GGUF's Q4_1 blocks de-quantize to values bf16 cannot hold,
    and the fp16/int8 exports should start from the exact weights.  Needs ``gguf`` and
    ``accelerate`` (transformers refuses GGUF loading without it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    source, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
