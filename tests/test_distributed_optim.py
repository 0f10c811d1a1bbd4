"""The stateless optimizers on sharded (DTensor) parameters match the single-process step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed_helpers import spawn

pytestmark = pytest.mark.slow

# (global shape, shard dim): uneven rows (5 over 2 ranks: 3 + 2; 1 row: 1 + 0, an empty shard), columns
SHAPES = [((5, 4), 0), ((7, 3), 0), ((1, 4), 0), ((6, 5), 1), ((4, 3), 1), ((3, 2, 3), 0), ((4, 3, 3), 1)]


def _params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 10.0 ** (i % 3 - 1), dim)
            for i, (shape, dim) in enumerate(SHAPES)]


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


def _sharded_step(rank, world, name, kw, seed, only=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    items = [it for i, it in enumerate(_params(seed)) if only is None or i in only]
    ps = []
    for w, g, dim in items:
        p = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(dim)]))
        p.grad = distribute_tensor(g, mesh, [Shard(dim)])
        ps.append(p)
    _make(name, ps, **kw).step()
    return [p.detach().full_tensor() for p in ps], [w for w, _, _ in items]


def _check_matches(rank, world, configs):
    for name, kw in configs:
        got, before = _sharded_step(rank, world, name, kw, seed=1)
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
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_sharded_step_matches_single_process(method):
    """Row-sharded matrices with uneven and empty shards, column-sharded ones, 3-D ones: one step on 2
    ranks equals the single-process step to fp32 rounding."""
    spawn(_check_matches, CONFIGS[method])


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


def test_sinkgd_collectives_do_not_grow_with_matrices():
    """One SinkGD step with L = 5 costs at most L + 3 all-reduces for one matrix, for four row-sharded
    ones and for seven of both layouts."""
    spawn(_count_collectives, 5, [(0,), (0, 1, 2, 5), None])
