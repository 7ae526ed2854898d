"""Token choice for the PyTorch engines: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from medserve.accel.protocol import Sampling  # noqa: E402
from medserve.accel.torch_sampling import choose_token, filter_logits, new_generator  # noqa: E402


def probabilities(*values: float) -> torch.Tensor:
    """Logits whose softmax is exactly these probabilities."""
    return torch.log(torch.tensor(values, dtype=torch.float32))


def test_greedy_is_argmax_whatever_the_generator() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    for seed in range(5):
        assert (
            choose_token(logits, Sampling(max_tokens=1, temperature=0.0), new_generator(seed)) == 1
        )


def test_top_k_keeps_exactly_the_k_best() -> None:
    filtered = filter_logits(torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0]), 1.0, 2, 1.0)
    assert [i for i, v in enumerate(filtered.tolist()) if math.isfinite(v)] == [1, 3]


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    logits = probabilities(0.5, 0.3, 0.15, 0.05)

    def kept(top_p: float) -> list[int]:
        filtered = filter_logits(logits, 1.0, 0, top_p).tolist()
        return [i for i, v in enumerate(filtered) if math.isfinite(v)]

    assert kept(0.5) == [0]
    assert kept(0.6) == [0, 1]
    assert kept(0.9) == [0, 1, 2]
    assert kept(0.01) == [0]  # never empty


def test_draws_follow_the_filtered_distribution() -> None:
    logits = probabilities(0.6, 0.3, 0.1)
    sampling = Sampling(max_tokens=1, temperature=1.0, top_k=2)
    generator = new_generator(0)
    draws = [choose_token(logits, sampling, generator) for _ in range(3000)]
    assert 2 not in draws  # cut by top-k
    assert abs(draws.count(0) / len(draws) - 2 / 3) < 0.04  # 0.6 / (0.6 + 0.3)


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    logits = torch.zeros(1000)  # uniform: any difference comes from the random stream
    sampling = Sampling(max_tokens=1, temperature=1.0)

    def draw(seed: int | None) -> list[int]:
        generator = new_generator(seed)
        return [choose_token(logits, sampling, generator) for _ in range(20)]

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)
    assert draw(None) != draw(None)
