"""multinorm.memory: every registry optimizer has an analytic memory, and the counts follow the formulas."""

import pytest

from multinorm.memory import METHODS, analytic_memory, state_elements
from multinorm.optim import OPTIMIZERS

STATELESS = ("sgd", "sinkgd", "swan", "swan-nsds", "mngd", "swan-0")

# The 60M benchmark config: d = 512, f = 1376, 8 layers, vocabulary 32,000, untied head.
D, F, LAYERS, VOCAB = 512, 1376, 8, 32000
HIDDEN_60M = LAYERS * (4 * D * D + 3 * D * F)  # q, k, v, o (d x d); gate, up (f x d); down (d x f)
TOTAL_60M = 2 * VOCAB * D + LAYERS * (4 * D * D + 3 * D * F + 2 * D) + D


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_registry_optimizer_has_an_analytic_memory(name):
    assert name in METHODS
    mem = analytic_memory("nano", name, vocab_size=4096)
    assert mem["method"] == name and mem["bytes"] > 0
    # weights are always counted, optimizer states never negative
    assert mem["bytes"] >= 2 * mem["parameters"] and mem["state_elements"] >= 0


@pytest.mark.parametrize("name", STATELESS)
def test_stateless_methods_keep_no_hidden_matrix_state(name):
    assert state_elements("60m", name)["hidden"] == 0


def test_adamw_keeps_two_moments_per_hidden_matrix_entry():
    counts = state_elements("60m", "adamw")
    assert counts["hidden"] == 2 * HIDDEN_60M
    assert counts["rest"] == 2 * (TOTAL_60M - HIDDEN_60M)
    assert analytic_memory("60m", "adamw")["parameters"] == TOTAL_60M == 58_073_600


def test_mixed_methods_keep_adamw_state_on_the_rest_only():
    rest = 2 * (TOTAL_60M - HIDDEN_60M)
    for name in ("sinkgd", "swan", "swan-nsds", "mngd"):
        assert state_elements("60m", name) == {"hidden": 0, "rest": rest, "total": rest}
    assert state_elements("60m", "swan-0")["total"] == 0  # fully stateless
    assert state_elements("60m", "sgd")["total"] == 0      # plain SGD, no momentum


def test_analytic_memory_in_the_papers_convention():
    # 2 bytes x (weights + states): Adam everywhere, Adam on embeddings/head/norms only, nothing stateful
    assert analytic_memory("60m", "adamw")["GB"] == pytest.approx(2 * 3 * TOTAL_60M / 1e9)
    assert analytic_memory("60m", "sinkgd")["GB"] == pytest.approx(0.247, abs=5e-4)
    assert analytic_memory("60m", "swan-0")["GB"] == pytest.approx(0.116, abs=5e-4)


def test_low_rank_state_follows_the_rank():
    r = 16
    per_layer = {  # (m, n) of q, k, v, o, gate, up, down
        "galore": 4 * (D * r + 2 * r * D) + 2 * (D * r + 2 * r * F) + (D * r + 2 * r * F),
        "apollo": 4 * (2 * r * D) + 3 * (2 * r * F),
    }
    assert state_elements("60m", "galore", rank=r)["hidden"] == LAYERS * per_layer["galore"]
    assert state_elements("60m", "apollo", rank=r)["hidden"] == LAYERS * per_layer["apollo"]
    assert 0 < state_elements("60m", "galore")["hidden"] < state_elements("60m", "adamw")["hidden"]


@pytest.mark.parametrize("name", ["adam", "adamw-split", "SinkGD", ""])
def test_unknown_method_names_raise_a_clear_error(name):
    with pytest.raises(ValueError, match=r"unknown method .*valid methods: adamw, sgd, sinkgd"):
        state_elements("nano", name, vocab_size=4096)
    with pytest.raises(ValueError, match="unknown method"):
        analytic_memory("nano", name, vocab_size=4096)
