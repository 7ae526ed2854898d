"""Log-softmax, NLL and perplexity arithmetic against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from medserve.quant.accuracy import log_softmax, perplexity_from_nll, token_nll

# Logits ln(1..4) give the softmax 0.1, 0.2, 0.3, 0.4 exactly.
ROW = np.log([1.0, 2.0, 3.0, 4.0])


def test_log_softmax_of_a_known_row() -> None:
    assert log_softmax(ROW) == pytest.approx(np.log([0.1, 0.2, 0.3, 0.4]), abs=1e-12)


def test_token_nll_is_minus_log_probability_of_the_target() -> None:
    logits = np.stack([ROW, np.zeros(4)])
    nll = token_nll(logits, np.array([3, 0]))
    # -ln 0.4 and -ln 0.25 (uniform over 4)
    assert nll == pytest.approx([0.916290731874155, 1.3862943611198906], abs=1e-12)


def test_huge_logits_do_not_overflow() -> None:
    # exp(1000) is inf in float64: a naive softmax returns nan here.
    shifted = ROW + 1000.0
    assert token_nll(shifted[None, :], np.array([3])) == pytest.approx([0.916290731874155])
    assert np.isfinite(log_softmax(shifted)).all()
    # float32 logits, as the model returns them, are widened before the exp
    low = (ROW - 1e4).astype(np.float32)[None, :]
    assert token_nll(low, np.array([0])) == pytest.approx([-math.log(0.1)], abs=1e-3)


def test_token_nll_matches_log_softmax() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5.0, size=(6, 50))
    targets = rng.integers(0, 50, size=6)
    expected = -log_softmax(logits)[np.arange(6), targets]
    assert token_nll(logits, targets) == pytest.approx(expected, abs=1e-12)


def test_perplexity_is_exp_of_mean_nll() -> None:
    # p = 0.4 then p = 0.25: perplexity = 1 / sqrt(0.4 * 0.25) = sqrt(10)
    nll = token_nll(np.stack([ROW, np.zeros(4)]), np.array([3, 0]))
    assert perplexity_from_nll(nll) == pytest.approx(math.sqrt(10))
    assert perplexity_from_nll(np.log([2.0, 8.0])) == pytest.approx(4.0)


def test_uniform_logits_give_the_vocabulary_size() -> None:
    # A model that knows nothing is as perplexed as a fair die with vocab_size faces.
    vocab = 467
    nll = token_nll(np.zeros((10, vocab)), np.arange(10))
    assert perplexity_from_nll(nll) == pytest.approx(vocab)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="do not pair up"):
        token_nll(np.zeros((3, 5)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="no tokens"):
        perplexity_from_nll(np.array([]))
