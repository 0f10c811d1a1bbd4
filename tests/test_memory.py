"""multinorm.studies.memory: every registry optimizer has an analytic memory, and the counts follow the formulas."""

import pytest

import torch

from multinorm.llama import build_model
from multinorm.studies.memory import METHODS, analytic_memory, default_rank, state_elements
from multinorm.optim import OPTIMIZERS, build_optimizer, optimizer_state_bytes

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
    # (m, n) of q, k, v, o (d x d), gate, up (f x d), down (d x f): a min(m, n) x r projector plus two
    # r x max(m, n) moments; APOLLO's random projector is kept in the state like GaLore's SVD one
    per_layer = 4 * (D * r + 2 * r * D) + 3 * (D * r + 2 * r * F)
    for name in ("galore", "fira", "apollo", "apollo-mini"):
        assert state_elements("60m", name, rank=r)["hidden"] == LAYERS * per_layer
    assert 0 < state_elements("60m", "galore")["hidden"] < state_elements("60m", "adamw")["hidden"]


def test_default_rank_is_the_benchmark_rank_at_paper_sizes_and_the_registry_default_elsewhere():
    assert default_rank("60m", "galore") == 128 and default_rank("1b", "galore") == 512
    assert default_rank("350m", "apollo-mini") == 1
    for name in ("galore", "fira", "apollo", "apollo-mini"):
        for model in ("nano", "micro"):
            assert default_rank(model, name) == OPTIMIZERS[name].defaults["rank"]
    assert default_rank("micro", "apollo-mini") == 1
    assert default_rank("micro", "adamw") is None and default_rank("micro", "sinkgd") is None
    assert state_elements("micro", "apollo-mini", vocab_size=4096) == state_elements(
        "micro", "apollo-mini", rank=1, vocab_size=4096)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_analytic_state_is_what_the_optimizer_keeps(name):
    # One step of the registry's optimizer (its default hyperparameters) on nano: the bytes in its state are
    # the analytic count in fp32, plus one-element tensors (step counters, norm-growth-limiter norms) that the
    # count leaves out, at most one per parameter tensor.
    torch.manual_seed(0)
    model = build_model("nano", 4096)
    optimizer = build_optimizer(model, name, 1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    measured = optimizer_state_bytes(optimizer)
    analytic = 4 * state_elements("nano", name, vocab_size=4096)["total"]
    n_tensors = len(list(model.parameters()))
    assert 0 <= measured - analytic <= 4 * n_tensors and (measured - analytic) % 4 == 0


@pytest.mark.parametrize("name", ["adam", "adamw-split", "SinkGD", ""])
def test_unknown_method_names_raise_a_clear_error(name):
    with pytest.raises(ValueError, match=r"unknown method .*valid methods: adamw, sgd, sinkgd"):
        state_elements("nano", name, vocab_size=4096)
    with pytest.raises(ValueError, match="unknown method"):
        analytic_memory("nano", name, vocab_size=4096)


def test_the_compiled_sinkgd_step_has_a_fixed_resident_cost():
    """numba, llvmlite and the compiled loop stay resident once SinkGD's fused CPU step has run (notebook 03
    sets it against the peak RSS of SinkGD and AdamW runs)."""
    from multinorm.studies.memory import compiled_step_rss_bytes

    assert 10e6 < compiled_step_rss_bytes() < 1e9
