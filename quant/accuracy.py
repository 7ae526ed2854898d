"""Perplexity of an exported OpenVINO IR model, and the gate a quantized export must pass.

The model is run with the OpenVINO runtime directly (not openvino_genai), one text per forward
pass on the stateful IR, so every position's logits are scored. Activations, KV cache and
matmuls are kept in f32: the figure then measures the exported weights alone and is the same
on every CPU, whatever bf16 or int8 shortcuts that CPU's plugin would take by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import openvino as ov

# General clinical-style prose written for this check: guidance, no patient and no case.
EVAL_TEXTS = (
    "Hand hygiene is the most effective way to prevent the spread of infection in hospitals. "
    "Staff should clean their hands before touching a patient, before a clean or aseptic "
    "procedure, after exposure to body fluids, after touching a patient, and after touching "
    "the patient's surroundings. Alcohol-based hand rub is preferred unless hands are visibly "
    "soiled, in which case soap and water should be used.",
    "Blood pressure should be measured with the patient seated and rested for at least five "
    "minutes, with the back supported and the arm at the level of the heart. The cuff must be "
    "the correct size for the arm. Two readings taken one to two minutes apart are averaged, "
    "and a raised reading should be confirmed on a separate occasion before a diagnosis of "
    "hypertension is made.",
    "Medication reconciliation is the process of comparing the medicines a patient was taking "
    "before admission with the medicines ordered in hospital. Any difference should be "
    "explained and documented. The list is reviewed again at transfer and at discharge, so "
    "that doses are not omitted or duplicated and that stopped medicines are not restarted "
    "by mistake.",
    "Sepsis is a life-threatening reaction to an infection. Early warning signs include a high "
    "or low temperature, a fast heart rate, fast breathing, low blood pressure and new "
    "confusion. When sepsis is suspected, blood cultures should be taken, antibiotics given "
    "promptly, and the response to treatment monitored closely by the clinical team.",
    "Before a planned operation, the surgical team confirms the identity of the patient, the "
    "procedure, the site and the consent. Allergies, the expected blood loss and the need for "
    "antibiotic prophylaxis are discussed. A short checklist read aloud at each stage helps the "
    "team notice problems before they cause harm.",
)


class AccuracyError(RuntimeError):
    """A model folder cannot be scored: missing files or an unexpected model signature."""


@dataclass(frozen=True)
class AccuracyReport:
    """A candidate export's perplexity against its reference on the same texts."""

    candidate_ppl: float
    reference_ppl: float
    relative_increase: float
    """``candidate_ppl / reference_ppl - 1``: 0.05 means 5 % worse than the reference."""
    passed: bool
    max_relative_increase: float

    def describe(self) -> str:
        return (
            f"perplexity {self.candidate_ppl:.3f} vs reference {self.reference_ppl:.3f} "
            f"({self.relative_increase:+.2%}, allowed {self.max_relative_increase:+.2%})"
        )


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets[i]`` under the softmax of ``logits[i]``.

    ``logits`` is [n, vocab], ``targets`` is [n]. Computed as ``logsumexp(row) - row[target]``
    in float64 with the row maximum subtracted first, so large logits cannot overflow exp().
    """
    rows = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if rows.ndim != 2 or targets.shape != (rows.shape[0],):
        raise ValueError(f"logits {rows.shape} and targets {targets.shape} do not pair up")
    peak = rows.max(axis=-1)
    logsumexp = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=-1))
    return logsumexp - rows[np.arange(len(targets)), targets]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity_from_nll(nll: np.ndarray) -> float:
    """exp of the mean NLL: the corpus perplexity when ``nll`` holds every scored token."""
    nll = np.asarray(nll, dtype=np.float64)
    if nll.size == 0:
        raise ValueError("no tokens were scored")
    return float(math.exp(nll.mean()))


def perplexity(
    model_dir: Path, texts: Sequence[str], *, max_tokens: int = 256, device: str = "CPU"
) -> float:
    """Corpus perplexity of the IR in ``model_dir`` over ``texts`` (first ``max_tokens`` each).

    Each text is tokenized with the folder's own tokenizer IR (special tokens as the model
    adds them) and scored in one forward pass from an empty state: token i+1 given tokens
    0..i. Tokens of all texts are pooled, so a longer text weighs more, as in the usual
    definition.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}: at least 2 tokens are needed to score one")
    if not texts:
        raise ValueError("texts is empty: nothing to score")
    model_dir = Path(model_dir)
    request, inputs = _compile(model_dir, device)
    token_ids = _tokenize(model_dir, texts, max_tokens)
    nll = []
    for ids in token_ids:
        # The KV cache lives in the request's state: without a reset the next text would
        # attend to the previous one.
        request.reset_state()
        feed = {
            "input_ids": ids[None, :],
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None, :],
            "beam_idx": np.zeros(1, dtype=np.int32),
        }
        request.infer({name: feed[name] for name in inputs})
        logits = request.get_tensor("logits").data[0]
        # In row blocks: float64 copies of a 150k-token vocabulary would otherwise take
        # hundreds of MB per text.
        for start in range(0, len(ids) - 1, _ROWS_PER_BLOCK):
            stop = min(start + _ROWS_PER_BLOCK, len(ids) - 1)
            nll.append(token_nll(logits[start:stop], ids[start + 1 : stop + 1]))
    return perplexity_from_nll(np.concatenate(nll))


def compare_to_reference(
    candidate_dir: Path,
    reference_dir: Path,
    texts: Sequence[str] = EVAL_TEXTS,
    max_relative_increase: float = 0.10,
) -> AccuracyReport:
    """Score both folders on ``texts``; passed iff the candidate is at most that much worse.

    A negative ``max_relative_increase`` demands the candidate be better than the reference.
    """
    if not math.isfinite(max_relative_increase):
        raise ValueError(f"max_relative_increase={max_relative_increase}: use a finite number")
    candidate = perplexity(candidate_dir, texts)
    reference = perplexity(reference_dir, texts)
    if not math.isfinite(reference):
        raise AccuracyError(f"reference {reference_dir} has perplexity {reference}: not usable")
    increase = candidate / reference - 1.0
    # A NaN from a broken export compares False everywhere; check it explicitly all the same.
    passed = math.isfinite(candidate) and increase <= max_relative_increase
    return AccuracyReport(candidate, reference, increase, passed, max_relative_increase)


_ROWS_PER_BLOCK = 32
_REQUIRED_INPUTS = ("input_ids", "attention_mask")
_KNOWN_INPUTS = ("input_ids", "attention_mask", "position_ids", "beam_idx")
# f32 everywhere and no dynamic int8 activations: see the module docstring.
_ACCURATE_CPU_CONFIG = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
}


def _compile(model_dir: Path, device: str) -> tuple[ov.InferRequest, list[str]]:
    import openvino as ov

    xml = model_dir / "openvino_model.xml"
    if not xml.is_file():
        raise AccuracyError(f"{xml} not found: not an exported OpenVINO model folder")
    core = ov.Core()
    model = core.read_model(xml)
    inputs = [port.get_any_name() for port in model.inputs]
    unknown = sorted(set(inputs) - set(_KNOWN_INPUTS))
    missing = [name for name in _REQUIRED_INPUTS if name not in inputs]
    if unknown or missing or "logits" not in {n for o in model.outputs for n in o.get_names()}:
        raise AccuracyError(
            f"{xml} has inputs {inputs} and outputs "
            f"{[o.get_any_name() for o in model.outputs]}: expected a stateful causal LM export "
            f"with inputs {list(_KNOWN_INPUTS)} and output logits"
        )
    config = _ACCURATE_CPU_CONFIG if device == "CPU" else {}
    compiled = core.compile_model(model, device, config)
    return compiled.create_infer_request(), inputs


def _tokenize(model_dir: Path, texts: Sequence[str], max_tokens: int) -> list[np.ndarray]:
    import openvino_genai

    tokenizer = openvino_genai.Tokenizer(str(model_dir))
    encoded = []
    for index, text in enumerate(texts):
        ids = np.asarray(tokenizer.encode(text).input_ids.data[0], dtype=np.int64)[:max_tokens]
        if len(ids) < 2:
            raise ValueError(f"texts[{index}] is {len(ids)} token(s) long: nothing to score")
        encoded.append(ids)
    return encoded
