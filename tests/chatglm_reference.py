"""Reference logits and greedy continuations for the tiny GLM-family checkpoints, and the
same quantities read from an exported OpenVINO folder, so tests compare like with like.

References:
- ``chatglm`` layout: fixtures made once with the upstream ``modeling_chatglm.py`` as oracle
  (tests/data/chatglm/README.md says how); the upstream code is not part of medserve.
- ``glm`` / ``glm4`` layouts: transformers' own ``GlmForCausalLM`` / ``Glm4ForCausalLM`` in
  fp32, computed here from the tiny checkpoint.

The OpenVINO side runs at f32 inference precision: the tests check the conversion, not the
CPU's bf16 arithmetic (which the default precision hint would add on AVX512-BF16 machines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data" / "chatglm"
NEW_TOKENS = 32
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
PROMPT_MESSAGES = (
    {"role": "system", "content": "You are a clinical assistant."},
    {"role": "user", "content": "患者发热三天，体温39度。What should we check first?"},
)


@dataclass(frozen=True)
class Reference:
    prompt_ids: list[int]
    logits: np.ndarray
    """[len(prompt_ids), vocab] float32."""
    greedy_ids: list[int]
    min_margin: float
    """Smallest top1-top2 logit gap over the greedy steps: how robust token equality is."""


def fixture_reference(name: str) -> tuple[Reference, dict]:
    """The oracle fixture of a ``chatglm``-layout tiny checkpoint, and its metadata."""
    data = np.load(DATA_DIR / f"model_{name}.npz")
    meta = json.loads(str(data["meta"]))
    return (
        Reference(
            prompt_ids=data["prompt_ids"].tolist(),
            logits=data["logits"],
            greedy_ids=data["greedy_ids"].tolist(),
            min_margin=float(data["margins"].min()),
        ),
        meta,
    )


def transformers_reference(checkpoint: Path) -> Reference:
    """fp32 PyTorch forward of a ``glm``/``glm4`` checkpoint through transformers itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    text = tokenizer.apply_chat_template(
        [dict(m) for m in PROMPT_MESSAGES], tokenize=False, add_generation_prompt=True
    )
    prompt = list(tokenizer.encode(text, add_special_tokens=False))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()

    def forward(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=False).logits[0]

    logits = forward(prompt).numpy()
    ids, margins = list(prompt), []
    for _ in range(NEW_TOKENS):  # full recompute: no KV-cache code in the reference path
        last = forward(ids)[-1]
        top = torch.topk(last, 2).values
        margins.append(float(top[0] - top[1]))
        ids.append(int(last.argmax()))
    return Reference(prompt, logits, ids[len(prompt) :], min(margins))


def ir_logits(model_dir: Path, prompt_ids: list[int]) -> np.ndarray:
    """Logits of every prompt position from the exported IR (one stateful forward pass)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model_dir / "openvino_model.xml"), "CPU", F32)
    request = compiled.create_infer_request()
    ids = np.array([prompt_ids], dtype=np.int64)
    request.reset_state()
    request.infer(
        {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
            "beam_idx": np.array([0], dtype=np.int32),
        }
    )
    return request.get_tensor("logits").data[0].copy()


def genai_greedy(model_dir: Path, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy continuation through OpenVINO GenAI (KV cache, as the server decodes)."""
    import openvino as ov
    import openvino_genai as ov_genai

    pipeline = ov_genai.LLMPipeline(str(model_dir), "CPU", **F32)
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = new_tokens
    config.do_sample = False
    config.ignore_eos = True  # random weights may pick a stop token
    ids = np.array([prompt_ids], dtype=np.int64)
    inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
    return [int(t) for t in pipeline.generate(inputs, config).tokens[0]]
