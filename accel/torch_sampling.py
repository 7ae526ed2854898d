"""Next-token choice from one row of logits, for the PyTorch engines (ipex-llm, IPEX).

OpenVINO GenAI samples inside its pipeline; the PyTorch engines step the model one forward at
a time and choose the token here. Pure functions of (logits, settings, generator), so a seeded
request gives the same text whatever else the engine is running: each request owns its
``torch.Generator``, and the order in which the scheduler serves requests never touches it.

Imported only inside an engine's own virtual environment (it imports torch).
"""

from __future__ import annotations

import torch
from medserve.accel.protocol import Sampling


def new_generator(seed: int | None) -> torch.Generator:
    """A private random stream for one request: seeded when the client asked for it."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()  # fresh entropy: unseeded requests differ from one another
    else:
        generator.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k and the top-p nucleus at -inf.

    ``logits`` is one row [vocab]. top_k 0 and top_p 1.0 disable their filter. The nucleus is
    the smallest set of most likely tokens whose probabilities sum to at least ``top_p``; the
    most likely token always stays, so a tiny top_p degenerates to greedy, never to nothing.
    """
    scaled = logits.float() / max(float(temperature), 1e-5)
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = (cumulative - torch.softmax(ordered, dim=-1)) >= top_p
        drop[0] = False
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return scaled


def choose_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Greedy (argmax) at temperature 0, else a draw from the filtered distribution."""
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits))
    filtered = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
