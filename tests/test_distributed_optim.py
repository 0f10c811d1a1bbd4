"""The stateless optimizers on sharded (DTensor) parameters match the single-process step."""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
import torch.distributed as dist

from distributed_helpers import spawn

pytestmark = pytest.mark.slow

# (global shape, shard dim): uneven rows (5 over 2 ranks: 3 + 2; 1 row: 1 + 0, an empty shard), columns
SHAPES = [((5, 4), 0), ((7, 3), 0), ((1, 4), 0), ((6, 5), 1), ((4, 3), 1), ((3, 2, 3), 0), ((4, 3, 3), 1),
          ((9, 3), 0), ((6, 7), 1)]
# the last two: a zero row and a zero column at a tiny scale (SinkGD's factors of both reach their floor)
ZEROED = {7: (2, slice(None)), 8: (slice(None), 3)}


def _params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (shape, dim) in enumerate(SHAPES):
        w, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 10.0 ** (i % 3 - 1)
        if i in ZEROED:
            g[ZEROED[i]] = 0
            g *= 1e-30
        out.append((w, g, dim))
    return out


def _make(name: str, params, **kw):
    from multinorm.optim import MNGD, SWAN, SinkGD
    return {"sinkgd": SinkGD, "mngd": MNGD, "swan": SWAN}[name](params, **kw)


def _reference(name: str, kw: dict, seed: int):
    """The single-process step: the updated weights of every matrix."""
    ps = []
    for w, g, _ in _params(seed):
        p = torch.nn.Parameter(w.clone())
        p.grad = g.clone()
        ps.append(p)
    _make(name, ps, **kw).step()
    return [p.detach() for p in ps]


def _sharded_step(rank, world, name, kw, seed, only=None, replicated=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    items = [it for i, it in enumerate(_params(seed)) if only is None or i in only]
    ps = []
    for w, g, dim in items:
        if replicated:  # DDP: every rank holds the whole matrix and the same gradient
            p = torch.nn.Parameter(w.clone())
            p.grad = g.clone()
        else:
            p = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(dim)]))
            p.grad = distribute_tensor(g, mesh, [Shard(dim)])
        ps.append(p)
    opt = _make(name, ps, replica_group=dist.group.WORLD if replicated else None, **kw)
    computed = []
    if hasattr(opt, "_directions"):  # record the matrices this rank whitens
        real = opt._directions
        opt._directions = lambda groups, mats: computed.extend(m.shape for m in mats) or real(groups, mats)
    opt.step()
    if hasattr(opt, "_directions"):
        counts = [None] * world
        dist.all_gather_object(counts, len(computed))
        assert sum(counts) == len(ps) and min(counts) > 0, counts  # each matrix once, every rank has work
    full = [p.detach() if replicated else p.detach().full_tensor() for p in ps]
    return full, [w for w, _, _ in items]


def _check_matches(rank, world, configs, replicated=False):
    for name, kw in configs:
        got, before = _sharded_step(rank, world, name, kw, seed=1, replicated=replicated)
        want = _reference(name, kw, seed=1)
        for g, w, b in zip(got, want, before):
            err = ((g - b) - (w - b)).abs().max() / (w - b).abs().max()
            assert err <= 1e-5, (name, kw, tuple(b.shape), float(err))


CONFIGS = {
    "sinkgd": [("sinkgd", dict(lr=0.1, iters=5, weight_decay=0.1)), ("sinkgd", dict(lr=0.1, iters=1)),
               ("sinkgd", dict(lr=0.1, iters=3, maximize=True))],
    "mngd": [("mngd", dict(lr=0.1, norms=("row", "col"), iters=3)),
             ("mngd", dict(lr=0.1, norms=("gradnorm", "frobenius", "sign", "col"), iters=2, maximize=True)),
             ("mngd", dict(lr=0.1, norms=("gradnorm", "spectral"), iters=1))],
    "swan": [("swan", dict(lr=0.1, weight_decay=0.1)), ("swan", dict(lr=0.1, variant="nsds", gradnorm_axis="longer")),
             ("swan", dict(lr=0.1, whitening="exact", maximize=True))],
}


def _count_collectives(rank, world, iters, subsets):
    real = dist.all_reduce
    for only in subsets:
        counted = []

        def counting(*args, **kwargs):
            counted.append(1)
            return real(*args, **kwargs)

        dist.all_reduce = counting
        try:
            _sharded_step(rank, world, "sinkgd", dict(lr=0.1, iters=iters), seed=2, only=only)
        finally:
            dist.all_reduce = real
        assert 0 < len(counted) <= iters + 3, (only, len(counted))


def _checkpoint_roundtrip(rank, world, name):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    from multinorm.optim import build_optimizer

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
        fully_shard(model)
        hidden = lambda n, p: n in ("0.weight", "1.weight")  # noqa: E731
        return model, build_optimizer(model, name, lr=0.01, is_hidden=hidden)

    def train_step(model, opt, seed):
        torch.manual_seed(seed)
        model(torch.randn(6, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    model_a, opt_a = make()
    train_step(model_a, opt_a, 1)
    saved = get_optimizer_state_dict(model_a, opt_a)
    assert set(saved["state"]) == {"0.bias", "1.bias", "2.weight", "2.bias"}  # AdamW's; the hidden are stateless
    model_b, opt_b = make()
    model_b.load_state_dict(model_a.state_dict())
    # stateless matrices have no entry, so the load is not strict; a copy, as torch's load keeps the
    # given tensors, which opt_a goes on updating
    set_optimizer_state_dict(model_b, opt_b, copy.deepcopy(saved), options=StateDictOptions(strict=False))
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["lr"] = 0.02  # the state restored, the groups stay in use
    train_step(model_a, opt_a, 2)
    train_step(model_b, opt_b, 2)
    for (n, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), n


# Every check runs in one pair of processes (starting a pair costs seconds of imports); each is a subtest.
CHECKS = {
    # Row-sharded matrices with uneven and empty shards, column-sharded ones, 3-D ones: one step on 2 ranks
    # equals the single-process step to fp32 rounding.
    **{f"sharded {m} step = one-process step": (_check_matches, (CONFIGS[m],)) for m in CONFIGS},
    # Under DDP (whole matrices, equal gradients on every rank) SWAN whitens each matrix on one rank and
    # all-gathers the updates: the result equals the single-process step.
    "replicated SWAN split = one-process step": (_check_matches, (CONFIGS["swan"][:2], True)),
    # One SinkGD step with L = 5 costs at most L + 3 all-reduces for one matrix, for four row-sharded ones and
    # for seven of both layouts.
    "SinkGD all-reduces do not grow with matrices": (_count_collectives, (5, [(0,), (0, 1, 2, 5), None])),
    # The combined optimizer (stateless rule + AdamW) of an FSDP2 model saves and restores through
    # torch.distributed.checkpoint's state-dict API; training continues identically.
    **{f"FSDP2 {n} state round-trips through DCP": (_checkpoint_roundtrip, (n,)) for n in ("sinkgd", "swan")},
}


def _run_checks(rank, world, log_dir):
    for i, (fn, args) in enumerate(CHECKS.values()):
        try:
            fn(rank, world, *args)
        except BaseException:
            (log_dir / f"{i}.rank{rank}.failed").write_text(traceback.format_exc())
            raise  # the other rank may wait in a collective of this check: stop both
        dist.barrier()
        (log_dir / f"{i}.rank{rank}.ok").touch()


def test_sharded_optimizers_on_two_ranks(tmp_path, subtests):
    crash = None
    try:
        spawn(_run_checks, tmp_path)
    except Exception as exc:  # reported by the subtest of the check that raised it
        crash = exc
    for i, name in enumerate(CHECKS):
        with subtests.test(check=name):
            failed = sorted(tmp_path.glob(f"{i}.rank*.failed"))
            assert not failed, failed[0].read_text()
            assert all((tmp_path / f"{i}.rank{r}.ok").exists() for r in range(2)), \
                f"not run: an earlier check stopped the processes ({crash})"
