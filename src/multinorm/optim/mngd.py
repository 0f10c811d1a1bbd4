"""MNGD: gradient descent along a multi-normalised gradient (any sequence of normalisations)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..normalize import NORMALIZERS, multi_normalize
from .base import Check, ShardedBatch, StatelessMatrixOptimizer, compute_dtype, is_int_at_least
from .sharded_norms import multi_normalize_sharded

__all__ = ["MNGD"]


class MNGD(StatelessMatrixOptimizer):
    r"""Implements Multi-Normalized Gradient Descent (Algorithm 2 of Scetbon, Ma, Gong, Meeds, "Gradient
    Multi-Normalization for Stateless and Scalable LLM Training", arXiv 2502.06742).

    .. math::
        \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \lambda \text{ (weight decay)},\ L \text{ (iters)},\
                P_{g_1}, \ldots, P_{g_K} \text{ (norms)} \\
            &\textbf{for}\ t = 1, 2, \ldots: \\
            &\quad X \leftarrow \nabla_W f_t(W_{t-1}) \\
            &\quad \textbf{repeat}\ L\ \textbf{times}:\ \textbf{for}\ i = 1..K:\ X \leftarrow P_{g_i}(X) \\
            &\quad W_t \leftarrow W_{t-1}(1 - \gamma\lambda) - \gamma X
        \end{aligned}

    ``P_g(X) = argmax_{g(Z) <= 1} <X, Z>`` is the steepest direction of norm g, scaled to
    ``||P_g(X)||_F = sqrt(mn)``. Norm names: "row", "col", "spectral" (exact SVD), "frobenius", "sign",
    "gradnorm" (see :mod:`multinorm.normalize`), or callables on a (..., m, n) batch of matrices (a step
    applies them to the group's same-shape gradients stacked as one (k, m, n) tensor). ("row", "col") with
    L = 5 is SinkGD (which uses a faster equivalent), ("gradnorm", "spectral") with L = 1 is SWAN with
    exact whitening. Cost: ``L * sum_i cost(P_{g_i})`` per matrix, plus one copy of the gradients into the
    work buffer and the update; no state, no host synchronisation.

    ``maximize=True`` ascends the objective. The named norms are odd (``P(-G) = -P(G)``), so the update's
    sign is flipped; with a callable among ``norms`` the normalisations run on ``-G`` instead.

    Args:
        params: matrices to optimize (or parameter-group dicts).
        lr: learning rate (default 1e-3).
        norms: the sequence of normalisations (default ("row", "col")).
        iters: number L of passes over ``norms`` (default 5).
        weight_decay: decoupled weight decay (default 0).
        maximize: ascend the objective instead of descending (default False).
        replica_group: the process group whose ranks hold replicas of the plain parameters (DDP; default None).
    """

    def __init__(self, params, lr: float = 1e-3, norms: Sequence = ("row", "col"), iters: int = 5,
                 weight_decay: float = 0.0, *, maximize: bool = False, replica_group=None):
        super().__init__(params, dict(lr=lr, norms=norms, iters=iters, weight_decay=weight_decay, maximize=maximize),
                         replica_group)

    def _prepare_group(self, group: dict) -> None:
        norms = group["norms"]
        if isinstance(norms, str) or callable(norms):
            group["norms"] = (norms,)
        elif isinstance(norms, (list, tuple)):
            group["norms"] = tuple(norms)

    def _checks(self, group: dict) -> list[Check]:
        return super()._checks(group) + [
            ("norms", _valid_norms, f"a non-empty sequence of names from {list(NORMALIZERS)} or callables"),
            ("iters", is_int_at_least(1), "an int >= 1"),
        ]

    def direction(self, grads: Tensor, group: dict) -> Tensor:
        if group["maximize"] and any(callable(norm) for norm in group["norms"]):
            return multi_normalize(grads.neg_(), group["norms"], group["iters"]).neg_()
        return multi_normalize(grads, group["norms"], group["iters"])

    def update_sharded(self, batches: list[ShardedBatch]) -> None:
        """The same step on the local blocks of sharded matrices (:mod:`multinorm.optim.sharded_norms`):
        per operator, the sums spanning a split dimension of every matrix go in one all-reduce."""
        Xs = [torch.stack([g.to(compute_dtype(g.dtype)) for g in b.grads]) for b in batches]
        negate = [b.group["maximize"] and any(callable(n) for n in b.group["norms"]) for b in batches]
        for X, neg in zip(Xs, negate):
            if neg:
                X.neg_()
        Ds = multi_normalize_sharded(Xs, [b.sharding for b in batches],
                                     [list(b.group["norms"]) * b.group["iters"] for b in batches])
        for b, D, neg in zip(batches, Ds, negate):
            self.apply_updates(b.group, b.params, list((D.neg_() if neg else D).unbind(0)))


def _valid_norms(norms) -> bool:
    return isinstance(norms, tuple) and len(norms) > 0 and all(callable(n) or n in NORMALIZERS for n in norms)
