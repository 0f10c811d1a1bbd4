"""The optimizer registry and ``build_optimizer``: one optimizer over all trainable parameters.

Routing follows both papers and the GaLore benchmark they use: the attention and MLP projection
matrices of every block ("hidden", :func:`multinorm.optim.grouping.split_parameters`; pass ``is_hidden`` to
route another model's matrices) get the named method, while embeddings, LM head and norm gains ("rest")
get AdamW. ``adamw`` and ``sgd`` use one rule for both. The
result is a :class:`CombinedOptimizer` whose groups carry a ``"name"`` key ("hidden" / "rest").

Hyperparameters common to the methods that pair with AdamW: ``adam_lr`` (default: ``lr``), ``adam_betas``
((0.9, 0.999)), ``adam_eps`` (1e-8; 1e-6 for galore/apollo/fira, their packages' default, which their
benchmark scripts use), ``weight_decay`` (0.0, decoupled, applied to both groups). ``scale`` multiplies the
hidden group's update: the stateless methods and Muon run that group at ``scale * lr`` (the papers' "lr
0.02, alpha 0.05" is ``lr=0.02, scale=0.05``), GaLore/APOLLO/Fira pass it as their own scale/alpha.
AdamW is torch's, with its fused kernel (``fused=True``) wherever torch has one for every parameter it
gets (floating-point tensors on CPU or CUDA; not DTensors, whose FSDP2 shards fall back to torch's default
multi-tensor path): the same update, to float rounding, in fewer passes over memory
(:func:`adamw_implementation`; ``describe_optimizer`` names what was built, and ``python -m
multinorm.train`` records it in ``config.json``). Baselines (Muon, GaLore, APOLLO, Fira) come from torch and
their packages; they are not re-implemented (Muon only
chooses the precision of torch's Newton-Schulz iteration, :mod:`multinorm.optim.muon`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .combined import CombinedOptimizer
from .grouping import is_hidden_matrix, split_parameters
from .mngd import MNGD
from .muon import Muon
from .sinkgd import SinkGD
from .swan import SWAN

__all__ = ["OptimizerSpec", "OPTIMIZERS", "build_optimizer", "adamw_implementation", "describe_optimizer"]

Params = list[nn.Parameter]
Builder = Callable[[Params, Params, float, dict, Any], list[Optimizer]]


@dataclass(frozen=True)
class OptimizerSpec:
    """A registry entry: a one-line description, the hparams it accepts with their defaults, the
    builder ``(hidden, rest, lr, hparams, replica_group) -> [child optimizers]``, whether its step is known to be
    correct on FSDP2-sharded (DTensor) parameters (``sharded``; tested in tests/test_distributed_optim.py), and
    the install extra its package comes with (``extra``: ``pip install 'multinorm[baselines]'``)."""

    description: str
    builder: Builder
    defaults: Mapping[str, Any] = field(default_factory=dict)
    sharded: bool = False
    extra: str | None = None  # the install extra that brings its package, where it needs one


_ADAM = {"adam_lr": None, "adam_betas": (0.9, 0.999), "adam_eps": 1e-8, "weight_decay": 0.0}
_ADAM_PKG = {**_ADAM, "adam_eps": 1e-6}


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch >= 2.4 ships a fused AdamW kernel


def adamw_implementation(params: Params) -> dict[str, bool]:
    """AdamW's keyword for ``params``: ``{"fused": True}`` when torch's fused kernel can step every one of
    them (plain floating-point tensors on a device in ``FUSED_ADAMW_DEVICES``), else ``{}``: torch's
    default, its multi-tensor (foreach) path where it applies (DTensors, for instance)."""
    plain = all(type(p.data) is torch.Tensor for p in params)
    if plain and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def describe_optimizer(optimizer: Optimizer) -> list[str]:
    """One line per child optimizer: its class, AdamW's implementation, and the groups it steps, e.g.
    ``["SinkGD: hidden", "AdamW (fused): rest"]``."""
    children = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    lines = []
    for opt in children:
        name = type(opt).__name__
        if isinstance(opt, torch.optim.AdamW):  # as its groups run (a resumed state keeps its own)
            group = opt.param_groups[0]
            name += " (fused)" if group.get("fused") else " (foreach)" if group.get("foreach") else " (torch default)"
        groups = ", ".join(str(g.get("name", i)) for i, g in enumerate(opt.param_groups))
        lines.append(f"{name}: {groups}")
    return lines


def _rest_group(rest: Params, lr: float, hp: dict) -> dict:
    return {"params": rest, "name": "rest", "lr": lr if hp["adam_lr"] is None else hp["adam_lr"]}


def _adamw_rest(rest: Params, lr: float, hp: dict) -> list[Optimizer]:
    if not rest:
        return []
    return [torch.optim.AdamW([_rest_group(rest, lr, hp)], betas=tuple(hp["adam_betas"]), eps=hp["adam_eps"],
                              weight_decay=hp["weight_decay"], **adamw_implementation(rest))]


def _adamw(hidden: Params, rest: Params, lr: float, hp: dict, replica_group: Any = None) -> list[Optimizer]:
    groups = [{"params": hidden, "name": "hidden", "lr": lr}] + ([_rest_group(rest, lr, hp)] if rest else [])
    return [torch.optim.AdamW(groups, betas=tuple(hp["adam_betas"]), eps=hp["adam_eps"],
                              weight_decay=hp["weight_decay"], **adamw_implementation(hidden + rest))]


def _sgd(hidden: Params, rest: Params, lr: float, hp: dict, replica_group: Any = None) -> list[Optimizer]:
    groups = [{"params": hidden, "name": "hidden"}] + ([{"params": rest, "name": "rest"}] if rest else [])
    return [torch.optim.SGD(groups, lr=lr, momentum=hp["momentum"], nesterov=hp["nesterov"],
                            weight_decay=hp["weight_decay"])]


def _stateless(cls: type, keys: tuple[str, ...], fixed: Mapping[str, Any] | None = None) -> Builder:
    def build(hidden: Params, rest: Params, lr: float, hp: dict, replica_group: Any = None) -> list[Optimizer]:
        kwargs = {k: hp[k] for k in keys} | dict(fixed or {})
        opt = cls([{"params": hidden, "name": "hidden"}], lr=hp["scale"] * lr, weight_decay=hp["weight_decay"],
                  replica_group=replica_group, **kwargs)
        return [opt] + _adamw_rest(rest, lr, hp)
    return build


def _muon(hidden: Params, rest: Params, lr: float, hp: dict, replica_group: Any = None) -> list[Optimizer]:
    opt = Muon([{"params": hidden, "name": "hidden"}], lr=hp["scale"] * lr, weight_decay=hp["weight_decay"],
               momentum=hp["momentum"], nesterov=hp["nesterov"], ns_steps=hp["ns_steps"],
               adjust_lr_fn=hp["adjust_lr_fn"], ns_dtype=hp["ns_dtype"])
    return [opt] + _adamw_rest(rest, lr, hp)


def _galore(hidden: Params, rest: Params, lr: float, hp: dict, replica_group: Any = None) -> list[Optimizer]:
    from galore_torch import GaLoreAdamW

    groups = [{"params": hidden, "name": "hidden", "lr": lr, "rank": hp["rank"],
               "update_proj_gap": hp["update_proj_gap"], "scale": hp["scale"], "proj_type": hp["proj_type"]}]
    groups += [_rest_group(rest, lr, hp)] if rest else []
    return [GaLoreAdamW(groups, lr=lr, betas=tuple(hp["adam_betas"]), eps=hp["adam_eps"],
                        weight_decay=hp["weight_decay"], no_deprecation_warning=True)]


def _apollo(hidden: Params, rest: Params, lr: float, hp: dict, replica_group: Any = None) -> list[Optimizer]:
    from apollo_torch import APOLLOAdamW

    groups = [{"params": hidden, "name": "hidden", "lr": lr, "rank": hp["rank"], "proj": hp["proj"],
               "scale_type": hp["scale_type"], "update_proj_gap": hp["update_proj_gap"], "scale": hp["scale"],
               "proj_type": hp["proj_type"]}]
    groups += [_rest_group(rest, lr, hp)] if rest else []
    return [APOLLOAdamW(groups, lr=lr, betas=tuple(hp["adam_betas"]), eps=hp["adam_eps"],
                        weight_decay=hp["weight_decay"], scale_front=hp["scale_front"], disable_nl=hp["disable_nl"])]


def _fira(hidden: Params, rest: Params, lr: float, hp: dict, replica_group: Any = None) -> list[Optimizer]:
    from fira import FiraAdamW

    groups = [{"params": hidden, "name": "hidden", "lr": lr, "rank": hp["rank"],
               "update_proj_gap": hp["update_proj_gap"], "alpha": hp["scale"], "proj_type": hp["proj_type"]}]
    groups += [_rest_group(rest, lr, hp)] if rest else []
    return [FiraAdamW(groups, lr=lr, betas=tuple(hp["adam_betas"]), eps=hp["adam_eps"],
                      weight_decay=hp["weight_decay"], no_deprecation_warning=True)]


_SWAN_KEYS = ("ns_steps", "beta", "center", "rescale", "gradnorm_axis", "gradnorm", "whiten", "eps")
_SWAN_COMMON = {"center": True, "rescale": True, "gradnorm_axis": "input", "gradnorm": True, "whiten": True,
                "eps": 1e-8, "scale": 1.0}
_APOLLO_COMMON = {"update_proj_gap": 200, "proj": "random", "proj_type": "std", "scale_front": False,
                  "disable_nl": False, **_ADAM_PKG}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(
        "torch AdamW on every parameter", _adamw, dict(_ADAM), sharded=True),
    "sgd": OptimizerSpec(
        "torch SGD on every parameter", _sgd, {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}),
    "sinkgd": OptimizerSpec(
        "SinkGD (SR-Sinkhorn, stateless) on hidden matrices + AdamW",
        _stateless(SinkGD, ("iters", "eps", "momentum")), {"iters": 5, "eps": 1e-8, "momentum": 0.0, "scale": 1.0,
                                                           **_ADAM}, sharded=True),
    "swan": OptimizerSpec(
        "SWAN (GradNorm + Newton-Schulz whitening, stateless) on hidden matrices + AdamW",
        _stateless(SWAN, _SWAN_KEYS + ("whitening",), {"variant": "full"}),
        {"ns_steps": 10, "beta": 0.8, "whitening": "newton-schulz", **_SWAN_COMMON, **_ADAM}, sharded=True),
    "swan-nsds": OptimizerSpec(
        "SWAN with NSDS whitening (stateless) on hidden matrices + AdamW",
        _stateless(SWAN, _SWAN_KEYS + ("diagonal_z",), {"variant": "nsds"}),
        {"ns_steps": 2, "beta": 0.4, "diagonal_z": False, **_SWAN_COMMON, **_ADAM}, sharded=True),
    "mngd": OptimizerSpec(
        "multi-normalized GD (any norms, stateless) on hidden matrices + AdamW",
        _stateless(MNGD, ("norms", "iters")), {"norms": ("row", "col"), "iters": 5, "scale": 1.0, **_ADAM},
        sharded=True),
    "muon": OptimizerSpec(
        "torch.optim.Muon on hidden matrices + AdamW (Newton-Schulz in bf16 on CUDA, fp32 on CPU)", _muon,
        {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr_fn": None, "ns_dtype": "auto", "scale": 1.0,
         **_ADAM}),
    "galore": OptimizerSpec(
        "GaLore AdamW (galore-torch) with low-rank projection of hidden matrices", _galore,
        {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", **_ADAM_PKG}, extra="baselines"),
    "apollo": OptimizerSpec(
        "APOLLO (apollo-torch): channel-wise scaling, random projection", _apollo,
        {"rank": 128, "scale": 1.0, "scale_type": "channel", **_APOLLO_COMMON}, extra="baselines"),
    "apollo-mini": OptimizerSpec(
        "APOLLO-Mini (apollo-torch): rank 1, tensor-wise scaling, scale 128", _apollo,
        {"rank": 1, "scale": 128.0, "scale_type": "tensor", **_APOLLO_COMMON}, extra="baselines"),
    "fira": OptimizerSpec(
        "Fira AdamW (fira): low-rank Adam plus norm-scaled residual, norm-growth limiter", _fira,
        {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", **_ADAM_PKG}, extra="baselines"),
}

def build_optimizer(model: nn.Module, name: str, lr: float, *,
                    is_hidden: Callable[[str, nn.Parameter], bool] | None = None, replica_group: Any = None,
                    **hparams: Any) -> CombinedOptimizer:
    """One optimizer over all trainable parameters of ``model``: ``name`` on the hidden matrices, AdamW on
    the rest (see the module docstring). ``is_hidden(name, param)`` picks the hidden matrices (default:
    :func:`multinorm.optim.grouping.is_hidden_matrix`, the HF LLaMA projections). Unknown names or hparams
    raise ValueError listing the valid ones. Every trainable parameter lands in exactly one group (checked).
    ``replica_group``: under DDP, the process group whose ranks hold replicas of the model; the stateless
    methods take it at construction to split their work (SWAN whitens each matrix on one rank)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    spec = OPTIMIZERS[name]
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for optimizer {name!r}; "
            f"valid: {', '.join(sorted(spec.defaults)) or '(none)'}"
        )
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    hp = {**spec.defaults, **hparams}
    hidden, rest = split_parameters(model, is_hidden_matrix if is_hidden is None else is_hidden)
    try:
        children = spec.builder([p for _, p in hidden], [p for _, p in rest], lr, hp, replica_group)
    except ModuleNotFoundError as exc:
        if spec.extra is None:
            raise
        raise ModuleNotFoundError(f"optimizer {name!r} needs the package {exc.name!r}: "
                                  f"pip install 'multinorm[{spec.extra}]'", name=exc.name) from None
    optimizer = CombinedOptimizer(children)
    _check_coverage(model, optimizer)
    return optimizer


def _check_coverage(model: nn.Module, optimizer: Optimizer) -> None:
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    if len(grouped) != len(set(grouped)) or set(grouped) != trainable:
        raise RuntimeError("optimizer groups do not cover every trainable parameter exactly once")
