"""Perplexity of a PyTorch causal LM on the accuracy texts, scored like the OpenVINO gate.

Same texts (``accuracy.EVAL_TEXTS``), same truncation (first 256 tokens each), same special
tokens (as the tokenizer adds them), same pooling of every scored token, and the same
float64 NLL arithmetic (``accuracy.token_nll``), so a figure from here and one from the
OpenVINO path of the same source model can stand side by side. Runs inside an engine's
virtual environment (imports torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medserve.quant.accuracy import perplexity_from_nll, token_nll

MAX_TOKENS = 256


def torch_perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int = MAX_TOKENS,
    extra_inputs: Callable[[int], dict[str, Any]] | None = None,
) -> float:
    """Corpus perplexity: token i+1 given tokens 0..i, one forward per text from no cache.

    ``extra_inputs(n)`` adds engine-specific inputs for an n-token text (IPEX: its empty
    indirect-access cache and an attention mask).
    """
    if not texts:
        raise ValueError("texts is empty: nothing to score")
    nll = []
    for index, text in enumerate(texts):
        ids = list(tokenizer.encode(text))[:max_tokens]
        if len(ids) < 2:
            raise ValueError(f"texts[{index}] is {len(ids)} token(s) long: nothing to score")
        with torch.inference_mode():
            # use_cache=True although the cache is thrown away: ipex-llm's attention
            # forwards assume a cache object and fail without one.
            extra = extra_inputs(len(ids)) if extra_inputs is not None else {}
            logits = model(input_ids=torch.tensor([ids]), use_cache=True, **extra).logits[0]
        rows = logits[:-1].float().numpy()
        nll.append(token_nll(rows, np.asarray(ids[1:], dtype=np.int64)))
    return perplexity_from_nll(np.concatenate(nll))


def hf_perplexity(hf_dir: Path) -> float:
    """The unquantized reference: the HF folder in plain transformers, fp32, no engine."""
    from medserve.quant.accuracy import EVAL_TEXTS
    from medserve.quant.transformers4 import load_config, load_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir),
        config=load_config(hf_dir),
        torch_dtype=torch.float32,
        trust_remote_code=False,
        local_files_only=True,
    )
    model.eval()
    return torch_perplexity(model, load_tokenizer(hf_dir), EVAL_TEXTS)
