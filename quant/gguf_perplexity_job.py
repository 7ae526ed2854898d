"""Perplexity of a GGUF model under llama.cpp, scored like the OpenVINO gate (quant/accuracy.py).

Runs in ``.venv-llama-cpp``: ``python -m medserve.quant.gguf_perplexity_job MODEL_DIR`` prints
``{"perplexity": ..., "tokens": ...}``. Same texts (``accuracy.EVAL_TEXTS``), same truncation
(first 256 tokens each), special tokens as the model's tokenizer adds them, one evaluation per
text from an empty cache, every scored token pooled, float64 NLL (``accuracy.token_nll``):
a figure from here stands beside the OpenVINO and ipex-llm ones in ``quantize --preview``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from medserve.accel.cpu_features import check_native_build
from medserve.quant.accuracy import EVAL_TEXTS, perplexity_from_nll, token_nll

MAX_TOKENS = 256


def gguf_perplexity(model_dir: Path, *, max_tokens: int = MAX_TOKENS) -> tuple[float, int]:
    check_native_build("llama-cpp")
    import llama_cpp

    (gguf,) = sorted(Path(model_dir).glob("*.gguf"))
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=max_tokens + 8, logits_all=True, verbose=False
    )
    nll = []
    for text in EVAL_TEXTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:max_tokens]
        llm.reset()  # no KV from the previous text
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float32)
        nll.append(token_nll(logits, np.asarray(ids[1:])))
    scored = np.concatenate(nll)
    return perplexity_from_nll(scored), int(scored.size)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m medserve.quant.gguf_perplexity_job MODEL_DIR", file=sys.stderr)
        return 2
    value, tokens = gguf_perplexity(Path(argv[0]))
    print(json.dumps({"perplexity": value, "tokens": tokens}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
