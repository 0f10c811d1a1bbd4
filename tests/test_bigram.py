"""The count-bigram reference loss."""

import math

import numpy as np
import pytest

from multinorm.studies.bigram import bigram_loss


def test_a_deterministic_sequence_is_predicted_almost_perfectly():
    cycle = np.tile(np.arange(8), 40).reshape(10, 32)  # next token = previous + 1 mod 8
    out = bigram_loss(cycle, cycle[:3], vocab_size=8, ks=(1e-3,))
    assert out["loss"] < 0.01
    assert out["val_pairs"] == 3 * 31 and out["train_pairs"] == 10 * 31


def test_independent_uniform_tokens_cost_about_log_v():
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 16, (400, 64)), rng.integers(0, 16, (50, 64))
    assert bigram_loss(train, val, vocab_size=16)["loss"] == pytest.approx(math.log(16), abs=0.02)


def test_matches_the_formula_by_hand_and_picks_the_best_k():
    train = np.array([[0, 1, 0, 1, 0, 2]])
    val = np.array([[0, 2, 1]])
    V = 3
    # counts: 0->1: 2, 0->2: 1, 1->0: 2; row totals 0: 3, 1: 2
    def by_hand(k):
        p02 = (1 + k) / (3 + k * V)
        p21 = (0 + k) / (0 + k * V)
        return -(math.log(p02) + math.log(p21)) / 2
    out = bigram_loss(train, val, vocab_size=V, ks=(0.1, 1.0))
    assert out["loss"] == pytest.approx(min(by_hand(0.1), by_hand(1.0)))
    assert out["k"] == min((0.1, 1.0), key=by_hand)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="at least two tokens"):
        bigram_loss(np.zeros((3, 1), dtype=int), np.zeros((1, 4), dtype=int), 4)
    with pytest.raises(ValueError, match="positive"):
        bigram_loss(np.zeros((3, 4), dtype=int), np.zeros((1, 4), dtype=int), 4, ks=(0.0,))
