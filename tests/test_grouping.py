"""The hidden-matrix routing rule (multinorm.optim.grouping), without transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from multinorm.optim import HIDDEN_MATRIX_NAMES, is_hidden_matrix, split_parameters


class Block(nn.Module):
    """Two LLaMA-named projections, a norm gain and an untied head, without transformers."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(8, 8, bias=False)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(8, 16, bias=False)
        self.norm = nn.LayerNorm(8, bias=False)
        self.lm_head = nn.Linear(8, 32, bias=False)


def test_importing_the_optimizers_does_not_import_transformers():
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import multinorm.optim, multinorm.normalize, sys; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    # The studies' modules import it only when a model is built or trained, so redrawing from recorded runs
    # (`make figures REUSE=1`) skips the seconds it takes.
    code = ("import multinorm.studies.convergence, multinorm.studies.sweep, multinorm.train, multinorm.llama, sys; "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_default_rule_picks_the_llama_projections_by_name():
    assert len(HIDDEN_MATRIX_NAMES) == 7
    matrix = nn.Parameter(torch.ones(2, 2))
    assert is_hidden_matrix("model.layers.3.mlp.down_proj.weight", matrix)
    assert is_hidden_matrix("model.layers.0.self_attn.k_proj.weight", matrix)
    assert not is_hidden_matrix("lm_head.weight", matrix)  # 2-D, but not a hidden matrix
    assert not is_hidden_matrix("model.layers.0.self_attn.k_proj.bias", matrix)


def test_split_claims_each_trainable_parameter_once():
    block = Block()
    block.norm.weight.requires_grad_(False)
    hidden, rest = split_parameters(block)
    assert [n for n, _ in hidden] == ["self_attn.q_proj.weight", "mlp.up_proj.weight"]
    assert [n for n, _ in rest] == ["lm_head.weight"]  # the frozen norm gain is left out
    assert all(p is dict(block.named_parameters())[n] for n, p in hidden + rest)


def test_a_custom_predicate_routes_another_models_matrices():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    hidden, rest = split_parameters(model, is_hidden=lambda name, p: p.ndim == 2 and name != "2.weight")
    assert [n for n, _ in hidden] == ["0.weight"]
    assert [n for n, _ in rest] == ["0.bias", "2.weight", "2.bias"]


def test_split_errors_are_clear():
    with pytest.raises(ValueError, match="no hidden matrices found: expected HF LLaMA.*is_hidden"):
        split_parameters(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="no hidden matrices found: is_hidden returned False"):
        split_parameters(nn.Sequential(nn.Linear(4, 4)), is_hidden=lambda name, p: False)
    with pytest.raises(ValueError, match=r"hidden matrix 0.bias has shape \(4,\), expected at least 2-D"):
        split_parameters(nn.Sequential(nn.Linear(4, 4)), is_hidden=lambda name, p: True)
