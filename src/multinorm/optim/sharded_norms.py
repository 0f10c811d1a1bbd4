"""MultiNorm's operators on the local blocks of sharded matrices (the sharded step of :class:`MNGD`).

Every batch of local blocks takes one operator at a time, all batches together, so that each statistic
spanning a split dimension is completed for all matrices by one packed all-reduce
(:func:`multinorm.optim.distributed.sum_over`). "row", "col", "frobenius", "gradnorm" and "sign" need
only such sums (and the largest entry of each matrix); "spectral" and callables need whole matrices, which
are gathered to every rank (each rank then computes them all: correct, not work-efficient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..normalize import DEFAULT_EPS, NORMALIZERS
from .distributed import Sharding, all_reduce_packed, gather_full, local_abs_max, local_block, sum_over

__all__ = ["multi_normalize_sharded"]

_UNIT_RMS = ("row", "col", "frobenius", "gradnorm")


def _sums(values: list[Tensor], axes: list, shardings: list[Sharding]) -> list[Tensor]:
    return sum_over(values, axes, [s.dim for s in shardings], shardings[0].group) if values else []


def _unit_rms_(Xs: list[Tensor], shardings: list[Sharding]) -> None:
    """Each matrix divided by its largest |entry|, then rescaled to entry RMS 1, in place (two collectives)."""
    if not Xs:
        return
    group = shardings[0].group
    maxima = all_reduce_packed([local_abs_max(X) for X in Xs], group, dist.ReduceOp.MAX)
    for X, mx in zip(Xs, maxima):
        X.div_(torch.where(mx > 0, mx, torch.ones_like(mx))[:, None, None])
    squares = _sums([X.square().sum(dim=(-2, -1)) for X in Xs], [None] * len(Xs), shardings)
    for X, sq, sh in zip(Xs, squares, shardings):
        rms = sq.sqrt() / math.sqrt(math.prod(sh.matrix_shape))
        X.div_(torch.where(rms > 0, rms, torch.ones_like(rms))[:, None, None])


def _apply(Xs: list[Tensor], shardings: list[Sharding], ops: list) -> list[Tensor]:
    """One operator per batch (None: leave it), all batches at once."""
    Xs = list(Xs)
    named = [i for i, op in enumerate(ops) if isinstance(op, str) and op in _UNIT_RMS]
    _unit_rms_([Xs[i] for i in named], [shardings[i] for i in named])
    # row and col norms, and gradnorm's row means: one packed reduction
    first = [i for i in named if ops[i] != "frobenius"]
    stats = _sums([Xs[i].square().sum(dim=-2 if ops[i] == "col" else -1, keepdim=True) if ops[i] != "gradnorm"
                   else Xs[i].sum(dim=-1, keepdim=True) for i in first],
                  [-2 if ops[i] == "col" else -1 for i in first], [shardings[i] for i in first])
    gradnorms = []
    for i, stat in zip(first, stats):
        m, n = shardings[i].matrix_shape
        if ops[i] == "row":
            Xs[i].mul_(math.sqrt(n) / stat.sqrt().clamp_min(DEFAULT_EPS))
        elif ops[i] == "col":
            Xs[i].mul_(math.sqrt(m) / stat.sqrt().clamp_min(DEFAULT_EPS))
        else:
            Xs[i].sub_(stat / n)
            gradnorms.append(i)
    squares = _sums([Xs[i].square().sum(dim=-1, keepdim=True) for i in gradnorms], [-1] * len(gradnorms),
                    [shardings[i] for i in gradnorms])
    for i, sq in zip(gradnorms, squares):
        Xs[i].div_((sq / shardings[i].matrix_shape[1]).sqrt().add_(DEFAULT_EPS))
    for i, op in enumerate(ops):
        if op == "sign":
            Xs[i] = torch.sign(Xs[i])
        elif op is not None and i not in named:  # whole matrices needed
            fn = op if callable(op) else NORMALIZERS[op]
            Xs[i] = local_block(fn(gather_full(Xs[i], shardings[i])), shardings[i]).contiguous()
    return Xs


def multi_normalize_sharded(Xs: Sequence[Tensor], shardings: Sequence[Sharding],
                            sequences: Sequence[Sequence]) -> list[Tensor]:
    """:func:`multinorm.normalize.multi_normalize` of batches of local blocks ``Xs[i]`` (b, m_l, n_l, compute
    dtype), batch i taking the operators ``sequences[i]`` in order (its norms repeated iters times)."""
    Xs, shardings = list(Xs), list(shardings)
    for k in range(max((len(s) for s in sequences), default=0)):
        Xs = _apply(Xs, shardings, [s[k] if k < len(s) else None for s in sequences])
    return Xs
