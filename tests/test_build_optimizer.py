"""The optimizer registry, build_optimizer routing and the combined optimizer, on the nano LLaMA."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from multinorm.llama import build_model, split_parameters
from multinorm.optim import OPTIMIZERS, CombinedOptimizer, SinkGD, build_optimizer, optimizer_state_bytes

VOCAB = 256


pytestmark = pytest.mark.usefixtures("one_thread")


def nano(seed=0):
    return build_model("nano", VOCAB, seed=seed)


def batch(seed=0, size=4, seq=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (size, seq), generator=g)


def train(model, opt, steps, x):
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# learning rates at which each method visibly fits one fixed batch within a few dozen steps (a registry
# entry not listed here is trained at DEFAULT_LR)
LRS = {"adamw": 3e-3, "sgd": 0.3, "sinkgd": 3e-3, "swan": 3e-3, "swan-nsds": 3e-3, "mngd": 3e-3, "muon": 0.02,
       "galore": 3e-3, "apollo": 3e-3, "apollo-mini": 3e-3, "fira": 3e-3}
DEFAULT_LR = 3e-3
SMALL = {"galore": {"rank": 16}, "apollo": {"rank": 16}, "fira": {"rank": 16}}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_registry_entry_is_described_and_accepts_its_own_defaults(name):
    spec = OPTIMIZERS[name]
    assert isinstance(spec.description, str) and spec.description.strip()
    assert callable(spec.builder)
    model = nano()
    # every listed default, passed back explicitly, is a valid hyperparameter with a working value
    opt = build_optimizer(model, name, 1e-3, **dict(spec.defaults))
    assert {g["name"] for g in opt.param_groups} == {"hidden", "rest"}


@pytest.fixture(scope="module")
def wiki_batch(data_cache_root):
    """One batch of real text: 4 sequences of 32 tokens of wiki-sample."""
    from multinorm.data import load_data

    data = load_data("wiki-sample", seq_len=32, vocab_size=4096, cache_dir=data_cache_root)
    return data.vocab_size, data.train_batch(0, 4)[0]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_lowers_the_loss_on_wiki_sample(name, wiki_batch):
    torch.manual_seed(0)
    vocab, x = wiki_batch
    model = build_model("nano", vocab, seed=0)
    opt = build_optimizer(model, name, LRS.get(name, DEFAULT_LR), **SMALL.get(name, {}))
    assert isinstance(opt, CombinedOptimizer) and isinstance(opt, torch.optim.Optimizer)
    losses = train(model, opt, 25, x)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def named_split(model):
    """(hidden, rest) as (name, parameter) lists, chosen by name here: the routing rule written out, not the
    function under test."""
    named = list(model.named_parameters())
    hidden = [(n, p) for n, p in named if n.endswith(tuple(f".{x}.weight" for x in PROJECTIONS))]
    return hidden, [(n, p) for n, p in named if not n.endswith(tuple(f".{x}.weight" for x in PROJECTIONS))]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_groups_are_named_and_cover_every_parameter_once(name):
    model = nano()
    opt = build_optimizer(model, name, 1e-3, **SMALL.get(name, {}))
    hidden, rest = named_split(model)
    assert len(hidden) == 7 * model.config.num_hidden_layers
    by_name = {}
    for group in opt.param_groups:
        by_name.setdefault(group["name"], []).extend(group["params"])
    assert set(by_name) == {"hidden", "rest"}
    assert {id(p) for p in by_name["hidden"]} == {id(p) for _, p in hidden}
    assert {id(p) for p in by_name["rest"]} == {id(p) for _, p in rest}
    assert any(p is model.lm_head.weight for p in by_name["rest"])  # 2-D but not a hidden matrix
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)


def test_a_custom_predicate_routes_a_non_llama_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = build_optimizer(model, "sinkgd", 1e-2, is_hidden=lambda name, p: name == "0.weight")
    assert isinstance(opt.optimizers[0], SinkGD) and opt.optimizers[0].param_groups[0]["params"] == [model[0].weight]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for n, p in model.named_parameters()
                                                              if n != "0.weight"}
    with pytest.raises(ValueError, match="no hidden matrices found"):
        build_optimizer(model, "sinkgd", 1e-2)  # the default rule knows LLaMA names only
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first


def test_frozen_parameters_are_left_out():
    model = nano()
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = build_optimizer(model, "sinkgd", 1e-3)
    assert all(p is not model.model.embed_tokens.weight for g in opt.param_groups for p in g["params"])


def test_hparams_reach_the_groups():
    model = nano()
    opt = build_optimizer(model, "sinkgd", 0.02, scale=0.05, iters=3, adam_lr=0.01, adam_betas=(0.8, 0.9),
                          weight_decay=0.1)
    hidden = next(g for g in opt.param_groups if g["name"] == "hidden")
    rest = next(g for g in opt.param_groups if g["name"] == "rest")
    assert hidden["lr"] == pytest.approx(1e-3) and hidden["iters"] == 3 and hidden["weight_decay"] == 0.1
    assert rest["lr"] == 0.01 and rest["betas"] == (0.8, 0.9) and rest["weight_decay"] == 0.1
    assert build_optimizer(model, "sinkgd", 0.02).param_groups[1]["lr"] == 0.02  # adam_lr defaults to lr
    swan = build_optimizer(model, "swan-nsds", 1e-3, diagonal_z=True)
    assert swan.param_groups[0]["variant"] == "nsds" and swan.param_groups[0]["ns_steps"] == 2
    assert swan.param_groups[0]["diagonal_z"] is True
    galore = build_optimizer(model, "galore", 1e-3, rank=8)
    assert galore.param_groups[0]["rank"] == 8 and galore.param_groups[0]["scale"] == 0.25
    mini = build_optimizer(model, "apollo-mini", 1e-3)
    assert (mini.param_groups[0]["rank"], mini.param_groups[0]["scale_type"], mini.param_groups[0]["scale"]) == \
           (1, "tensor", 128.0)
    apollo = build_optimizer(model, "apollo", 1e-3, rank=16)
    assert (apollo.param_groups[0]["proj"], apollo.param_groups[0]["scale_type"]) == ("random", "channel")
    fira = build_optimizer(model, "fira", 1e-3, rank=16, scale=0.5)
    assert fira.param_groups[0]["alpha"] == 0.5
    muon = build_optimizer(model, "muon", 0.02)
    assert isinstance(muon.optimizers[0], torch.optim.Muon)
    assert build_optimizer(model, "sgd", 0.1, momentum=0.9).param_groups[0]["momentum"] == 0.9


def test_adamw_split_lr_is_one_adamw_with_two_group_lrs():
    # The convergence study's "adamw-split" baseline: AdamW state for every parameter, hidden matrices at lr,
    # embeddings/head/norms at adam_lr.
    model = nano()
    opt = build_optimizer(model, "adamw", 4e-3, adam_lr=1e-3)
    assert len(opt.optimizers) == 1 and isinstance(opt.optimizers[0], torch.optim.AdamW)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"hidden": 4e-3, "rest": 1e-3}
    hidden, rest = split_parameters(model)
    assert [p for p in opt.param_groups[0]["params"]] == [p for _, p in hidden]
    assert [p for p in opt.param_groups[1]["params"]] == [p for _, p in rest]


def test_a_missing_baseline_package_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "galore_torch", None)  # as if galore-torch were not installed
    with pytest.raises(ModuleNotFoundError, match=r"optimizer 'galore' needs the package 'galore_torch': "
                                                   r"pip install 'multinorm\[baselines\]'"):
        build_optimizer(nano(), "galore", 1e-3)


def test_unknown_names_and_hparams_raise_clear_errors():
    model = nano()
    with pytest.raises(ValueError, match="valid names: adamw"):
        build_optimizer(model, "adam", 1e-3)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) ns_steps .*'sinkgd'.*valid: .*iters"):
        build_optimizer(model, "sinkgd", 1e-3, ns_steps=3)
    with pytest.raises(ValueError, match="adam_lr"):
        build_optimizer(model, "sgd", 1e-3, adam_lr=1e-3)


@pytest.mark.parametrize("name", ["sinkgd", "swan", "swan-nsds", "mngd"])
def test_hidden_matrices_have_no_optimizer_state(name):
    model, x = nano(), batch()
    opt = build_optimizer(model, name, 1e-3)
    train(model, opt, 2, x)
    hidden, rest = named_split(model)
    assert optimizer_state_bytes(opt, [p for _, p in hidden]) == 0
    assert opt.optimizers[0].state_dict()["state"] == {}
    # the AdamW group holds two moments per entry (plus a step counter per tensor)
    rest_bytes = optimizer_state_bytes(opt, [p for _, p in rest])
    assert 2 * 4 * sum(p.numel() for _, p in rest) <= rest_bytes <= 2 * 4 * sum(p.numel() for _, p in rest) + 64 * len(rest)
    assert optimizer_state_bytes(opt) == rest_bytes


def test_state_bytes_of_baselines():
    model, x = nano(), batch()
    n_params = sum(p.numel() for p in model.parameters())
    adamw = build_optimizer(model, "adamw", 1e-3)
    train(model, adamw, 1, x)
    assert optimizer_state_bytes(adamw) >= 8 * n_params
    galore = build_optimizer(model, "galore", 1e-3, rank=8)
    train(model, galore, 1, x)
    hidden = [p for _, p in split_parameters(model)[0]]
    # low-rank moments and projectors are far smaller than AdamW's full moments
    assert 0 < optimizer_state_bytes(galore, hidden) < 0.5 * 8 * sum(p.numel() for p in hidden)


@pytest.mark.parametrize("name", ["sinkgd", "swan", "muon"])
def test_state_dict_round_trip_resumes_exactly(name):
    x = batch()
    model_a = nano(seed=1)
    opt_a = build_optimizer(model_a, name, 3e-3)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        train(model_a, opt_a, 1, x)
        sched_a.step()
    model_b = copy.deepcopy(model_a)
    saved = copy.deepcopy(opt_a.state_dict())
    saved_sched = sched_a.state_dict()

    # the usual resume order: build optimizer and scheduler, then load both
    opt_b = build_optimizer(model_b, name, 3e-3)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0 / (1 + s))
    opt_b.load_state_dict(saved)
    sched_b.load_state_dict(saved_sched)
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]
    # the combined groups are the children's (new) group dicts, so the scheduler still drives the children
    assert all(a is b for a, b in zip(opt_b.param_groups, [g for o in opt_b.optimizers for g in o.param_groups]))
    for _ in range(2):
        train(model_a, opt_a, 1, x)
        sched_a.step()
        train(model_b, opt_b, 1, x)
        sched_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_combined_optimizer_conventions():
    model, x = nano(), batch()
    opt = build_optimizer(model, "sinkgd", 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 if s else 1.0)
    train(model, opt, 1, x)
    sched.step()
    assert [c.param_groups[0]["lr"] for c in opt.optimizers] == pytest.approx([1e-4, 1e-4])

    def closure():
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    before = model.lm_head.weight.detach().clone()
    loss = opt.step(closure)
    assert loss is not None and not torch.equal(before, model.lm_head.weight)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="add the parameter group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, 2))]})
    with pytest.raises(ValueError, match="more than one parameter group"):
        CombinedOptimizer([torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD([model.lm_head.weight], lr=0.1)])
    assert "SinkGD" in repr(opt) and "AdamW" in repr(opt)
    assert len(opt.state) > 0 and model.lm_head.weight in opt.state


def test_transformers_trainer_trains_with_a_built_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, x = nano(), batch(size=8)
    dataset = [{"input_ids": row, "labels": row} for row in x]
    opt = build_optimizer(model, "sinkgd", 3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 20)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, report_to="none",
                             use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, sched))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0], losses
    assert opt.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-3 * (1 - 8 / 20))


def test_combined_state_dict_has_torch_layout_and_loads_the_older_one():
    from multinorm.optim import CombinedOptimizer

    a, b, c = (torch.nn.Parameter(torch.randn(3, 2)) for _ in range(3))
    def make():
        return CombinedOptimizer([torch.optim.SGD([a], lr=0.1), torch.optim.AdamW([{"params": [b]}, {"params": [c]}])])
    opt = make()
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"} and [g["params"] for g in sd["param_groups"]] == [[0], [1], [2]]
    assert set(sd["state"]) == {1, 2}  # SGD without momentum keeps none
    fresh = make()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.optimizers[1].state[c]["exp_avg"], opt.optimizers[1].state[c]["exp_avg"])
    older = make()
    older.load_state_dict({"optimizers": [o.state_dict() for o in opt.optimizers]})
    assert torch.equal(older.optimizers[1].state[b]["exp_avg"], opt.optimizers[1].state[b]["exp_avg"])
    assert older.param_groups[1] is older.optimizers[1].param_groups[0]


def test_fused_and_foreach_adamw_give_the_same_loss_curve():
    """torch's fused AdamW is the same update as the multi-tensor one: on a short nano run the two loss curves
    agree to float32 rounding (so switching the reference AdamW to the fused kernel changes no result)."""
    curves = []
    for kw in ({"foreach": True}, {"fused": True}):
        model = nano()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, **kw)
        curves.append(train(model, opt, 12, batch(size=8)))
    assert curves[0][-1] < 0.9 * curves[0][0]  # it trains
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_adamw_parts_use_the_fused_kernel_where_torch_has_one():
    """AdamW and the AdamW part of every mixed method run torch's fused kernel on CPU float tensors; a
    parameter the kernel cannot take (an integer tensor stands in for one) leaves torch's default."""
    from multinorm.optim import adamw_implementation, describe_optimizer

    model = nano()
    for name, expected in [("adamw", ["AdamW (fused): hidden, rest"]),
                           ("sinkgd", ["SinkGD: hidden", "AdamW (fused): rest"]),
                           ("swan", ["SWAN: hidden", "AdamW (fused): rest"])]:
        opt = build_optimizer(model, name, 1e-3)
        assert describe_optimizer(opt) == expected
        adam = opt.optimizers[-1]
        assert all(g["fused"] for g in adam.param_groups)
    assert adamw_implementation([torch.nn.Parameter(torch.ones(2))]) == {"fused": True}
    assert adamw_implementation([torch.nn.Parameter(torch.ones(2)), torch.ones(2, dtype=torch.int64)]) == {}
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], foreach=True)
    assert describe_optimizer(plain) == ["AdamW (foreach): 0"]
