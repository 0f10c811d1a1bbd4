"""Named LLaMA configs and the hidden-matrix split."""

import math

import pytest
import torch

from multinorm.llama import HIDDEN_MATRIX_NAMES, MODEL_CONFIGS, build_model, count_parameters, split_parameters

PAPER_COUNTS = {"60m": 58_073_600, "130m": 134_105_856, "350m": 367_969_280, "1b": 1_339_082_752}


@pytest.mark.parametrize("name,total", PAPER_COUNTS.items())
def test_paper_sizes_have_exact_parameter_counts(name, total):
    model = build_model(name, device="meta")
    counts = count_parameters(model)
    assert counts["total"] == total
    shape = MODEL_CONFIGS[name]
    d, f, L, V = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.vocab_size
    assert counts["hidden"] == L * (4 * d * d + 3 * d * f)
    assert counts["rest"] == 2 * V * d + 2 * L * d + d


@pytest.mark.parametrize("name,expected_millions", [("nano", 0.8), ("micro", 3.2)])
def test_cpu_sizes_have_the_benchmark_block_shapes(name, expected_millions):
    counts = count_parameters(build_model(name, vocab_size=4096, device="meta"))
    assert counts["hidden"] / 1e6 == pytest.approx(expected_millions, rel=0.05)


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_split_claims_every_parameter_once_with_the_right_names(name):
    model = build_model(name, vocab_size=4096 if MODEL_CONFIGS[name].vocab_size is None else None, device="meta")
    hidden, rest = split_parameters(model)
    n_layers = MODEL_CONFIGS[name].num_hidden_layers
    assert len(hidden) == 7 * n_layers
    assert all(n.endswith(HIDDEN_MATRIX_NAMES) and p.ndim == 2 for n, p in hidden)
    rest_names = {n for n, _ in rest}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= rest_names
    assert len(rest) == 3 + 2 * n_layers  # embed, head, final norm + two norms per block
    assert len(hidden) + len(rest) == len(list(model.parameters()))


def test_lm_head_is_untied_and_two_dimensional_but_not_hidden():
    model = build_model("nano", vocab_size=512, device="meta")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    hidden, _ = split_parameters(model)
    assert "lm_head.weight" not in {n for n, _ in hidden}


def test_frozen_parameters_are_left_out_of_the_split():
    model = build_model("nano", vocab_size=512, device="meta")
    model.model.embed_tokens.weight.requires_grad_(False)
    hidden, rest = split_parameters(model)
    assert "model.embed_tokens.weight" not in {n for n, _ in rest}


def test_split_rejects_a_model_without_llama_names():
    with pytest.raises(ValueError, match="no hidden matrices"):
        split_parameters(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid models: nano, micro"):
        build_model("tiny", vocab_size=100)


def test_cpu_size_needs_a_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model("nano")


def test_seeded_init_is_reproducible_and_untrained_loss_is_near_uniform():
    a = build_model("nano", vocab_size=1000, seed=3)
    b = build_model("nano", vocab_size=1000, seed=3)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb)
    x = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = a(input_ids=x, labels=x).loss.item()
    assert abs(loss - math.log(1000)) < 0.5
