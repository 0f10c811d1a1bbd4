"""SinkGD: gradient descent along the SR-Sinkhorn normalisation of each gradient matrix."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..normalize import DEFAULT_EPS, sinkhorn_square_scalings, sr_sinkhorn, unit_max_root
from .base import (Check, ShardedBatch, StatelessMatrixOptimizer, compute_dtype, is_bool, is_float_at_least,
                   is_float_in, is_int_at_least, prescale_roots)
from .distributed import global_abs_max, sinkhorn_square_scalings_sharded

__all__ = ["SinkGD", "step_path", "compiled_step_available"]

# Entries per block of rows in the CPU path for one large matrix (1 MiB of float32: a block stays in cache
# between the operations that touch it).
CACHE_BLOCK = 1 << 18


@functools.cache
def compiled_step_available() -> bool:
    """Whether numba can be imported (``pip install multinorm[fast]``): the compiled CPU step needs it. Without
    it, ``fused=True`` falls back to the torch path, which computes the same step to float32 rounding. Asked on
    the first fused CPU step, so importing the package never imports numba."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def step_path(group: dict, params: list[Tensor], grads: list[Tensor], cache_block: int = CACHE_BLOCK) -> str:
    """The one place that picks how a batch of same-shape matrices is stepped (sharded matrices go to
    :meth:`SinkGD.update_sharded` before this):

    ``"compiled"``  the numba loop of :mod:`multinorm.optim.sinkgd_cpu`: ``fused=True``, CPU, eager mode, float32
                    contiguous matrices, numba installed;
    ``"blocked"``   the torch path for one CPU matrix larger than the caches, block of rows by block of rows;
    ``"batched"``   the torch path over the whole batch (every other case: GPUs, bf16, torch.compile).
    """
    if group["fused"] and grads[0].device.type == "cpu" and compiled_step_available():
        from . import sinkgd_cpu  # numba is imported on the first fused CPU step, not with the package

        if all(sinkgd_cpu.usable(p, g) for p, g in zip(params, grads)):
            return "compiled"
    if len(grads) == 1 and grads[0].device.type == "cpu" and grads[0].numel() > cache_block:
        return "blocked"
    return "batched"


class SinkGD(StatelessMatrixOptimizer):
    r"""Implements SinkGD (Algorithm 4 of Scetbon, Ma, Gong, Meeds, "Gradient Multi-Normalization for
    Stateless and Scalable LLM Training", arXiv 2502.06742).

    .. math::
        \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \lambda \text{ (weight decay)},\ L \text{ (iters)},\
                \mu \text{ (momentum, default 0)},\ W_0 \in \mathbb{R}^{m \times n} \\
            &\textbf{for}\ t = 1, 2, \ldots: \\
            &\quad G_t \leftarrow \nabla_W f_t(W_{t-1}) \\
            &\quad \textbf{if}\ \mu \neq 0:\ M_t \leftarrow \mu M_{t-1} + G_t\ (M_1 = G_1),\
                G_t \leftarrow M_t \\
            &\quad X \leftarrow G_t;\ \textbf{repeat}\ L\ \textbf{times}:\
                X \leftarrow \sqrt{n}\, Q(X)^{-1} X;\ \ X \leftarrow \sqrt{m}\, X R(X)^{-1} \\
            &\quad W_t \leftarrow W_{t-1}(1 - \gamma\lambda) - \gamma X
        \end{aligned}

    where ``Q(X)``/``R(X)`` are the diagonal matrices of row/column l2 norms: rows (output units) are
    normalised to norm sqrt(n) over the n = in_features entries, then columns to sqrt(m). The update has
    entry RMS 1 (``||X||_F = sqrt(mn)``), so ``lr`` is the per-entry step size; the paper's recipe is a
    global lr of 0.02 times alpha = 0.05 for these matrices, i.e. lr = 1e-3 here.

    With the paper's ``momentum=0`` (the default) there is no state: ``self.state`` stays empty. ``momentum``
    mu > 0 is an extension the paper does not have: one heavy-ball buffer per matrix (as torch's SGD keeps,
    without dampening), normalised in place of the gradient, so the method then has Adam-like memory for one
    buffer instead of two. It answers whether SinkGD's results come from the direction or from the missing
    averaging of gradient noise. SR-Sinkhorn is computed in its vector form
    (:func:`multinorm.normalize.sr_sinkhorn`), batched over the group's same-shape matrices and fused with
    the parameter update, without host synchronisation. With torch operations, the passes over each m x n
    gradient are: one read for its largest entry (an exact power-of-four prescale keeps the squares in range
    for any gradient scale), one writing ``(qG)^2`` into the work buffer (converting a bf16/fp16 gradient on
    the way), 2L mat-vecs reading ``A = (qG)^2``, one writing ``Diag(r) G`` over A, and one update
    ``W <- W (1 - lr wd) - lr (Diag(r) G) Diag(c)`` (decay a separate pass when wd > 0): ``(6 + 4L) mn``
    flops and one m x n fp32 buffer per matrix of the batch; on CPU a matrix larger than the caches is
    updated alone, block of rows by block of rows in the passes that allow it. A float32 matrix on CPU
    (``fused=True``, eager mode) is instead stepped by a compiled loop over its rows
    (:mod:`multinorm.optim.sinkgd_cpu`): L reads of G (each row gives its factor and, still cached, its
    share of the column sums; the first unscaled), then one pass updating W: no matrix buffer at all.

    Args:
        params: matrices to optimize (or parameter-group dicts); see ``StatelessMatrixOptimizer``.
        lr: learning rate (default 1e-3).
        iters: number L of row/column alternations (default 5).
        weight_decay: decoupled weight decay, ``W <- W (1 - lr * weight_decay)`` (default 0).
        eps: clamp for row/column norms of the unit-RMS gradient (default 1e-8).
        momentum: heavy-ball factor mu of the buffer that is normalised instead of the gradient (default 0:
            stateless, the paper's method).
        maximize: ascend the objective, ``W <- W + lr X``, instead of descending (default False).
        fused: on CPU, step each float32 matrix with the compiled loop of :mod:`multinorm.optim.sinkgd_cpu`,
            which reads the gradient once per Sinkhorn iteration and allocates no matrix buffer (default
            True; it needs numba, ``pip install multinorm[fast]``, and falls back to torch operations without
            it); False uses torch operations only, as on other devices and under ``torch.compile``. Which path
            a step takes is decided in one place, :func:`step_path`.
        replica_group: the process group whose ranks hold replicas of the plain parameters (DDP); see
            :class:`~multinorm.optim.base.StatelessMatrixOptimizer` (default None).
    """

    def __init__(self, params, lr: float = 1e-3, iters: int = 5, weight_decay: float = 0.0,
                 eps: float = DEFAULT_EPS, *, momentum: float = 0.0, maximize: bool = False, fused: bool = True,
                 replica_group=None):
        super().__init__(params, dict(lr=lr, iters=iters, weight_decay=weight_decay, eps=eps, momentum=momentum,
                                      maximize=maximize, fused=fused), replica_group)

    def _checks(self, group: dict) -> list[Check]:
        return super()._checks(group) + [
            ("iters", is_int_at_least(1), "an int >= 1"),
            ("eps", is_float_at_least(0.0), "a float >= 0"),
            ("momentum", is_float_in(0.0, 1.0), "a float in [0, 1)"),
            ("fused", is_bool, "a bool"),
        ]

    def direction(self, grads: Tensor, group: dict) -> Tensor:
        return sr_sinkhorn(grads, group["iters"], group["eps"])

    def update_batch(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """The step of a batch of same-shape matrices, by the path :func:`step_path` picks."""
        path = step_path(group, params, grads, CACHE_BLOCK)
        if path == "compiled":
            from . import sinkgd_cpu

            sinkgd_cpu.sinkgd_matrix_step(params, grads, group["iters"], group["eps"], group["lr"],
                                          group["weight_decay"], group["maximize"])
            return
        A = self.scratch((len(grads),) + tuple(grads[0].shape), compute_dtype(grads[0].dtype), grads[0].device)
        if path == "blocked":
            return self._update_large(group, params[0], grads[0], A[0])
        roots = self.prescaled_copy(grads, A, square=True).unsqueeze(-1)  # A = (q G)^2; bf16 converted once
        r, c = sinkhorn_square_scalings(A, group["iters"], group["eps"])
        r.mul_(roots)  # the factors of G itself (sqrt(q) into each, so neither overflows)
        c.mul_(roots)
        # A is spent: it receives Diag(r) G (the one read of G), and c is multiplied in on the way into the
        # parameter. G goes first: the factors of a zero row or column can be as large as 2^63 sqrt(q), and
        # the outer product r c^T would overflow where the entry it scales is zero (inf * 0 = nan).
        rows = [torch.mul(g, ri.unsqueeze(-1), out=a) for g, ri, a in zip(grads, r.unbind(0), A.unbind(0))]
        self.apply_updates(group, params, rows, factors=list(c.unsqueeze(-2).unbind(0)))

    def update_sharded(self, batches: list[ShardedBatch]) -> None:
        """The same step on the local blocks of sharded matrices: the prescale takes each matrix's global
        largest entry (one all-reduce for all matrices), and the Sinkhorn iteration completes its sums
        over the split dimension with one all-reduce per iteration for all matrices
        (:func:`multinorm.optim.distributed.sinkhorn_square_scalings_sharded`): ``iters + 2`` collectives
        per step."""
        As = [torch.stack([g.to(compute_dtype(g.dtype)) for g in b.grads]) for b in batches]
        maxima = global_abs_max(As, batches[0].sharding.group)
        roots = [unit_max_root(mx, A.dtype) for mx, A in zip(maxima, As)]
        for A, root in zip(As, roots):
            A.mul_(root.square()[:, None, None]).square_()
        factors = sinkhorn_square_scalings_sharded(As, [b.sharding for b in batches],
                                                   [b.group["iters"] for b in batches],
                                                   [b.group["eps"] for b in batches])
        for b, A, root, (r, c) in zip(batches, As, roots, factors):
            r.mul_(root[:, None])
            c.mul_(root[:, None])
            rows = [torch.mul(g, ri.unsqueeze(-1), out=a) for g, ri, a in zip(b.grads, r.unbind(0), A)]
            self.apply_updates(b.group, b.params, rows, factors=list(c.unsqueeze(-2).unbind(0)))

    def _update_large(self, group: dict, p: Tensor, g: Tensor, A: Tensor) -> None:
        """The same step for one matrix larger than the CPU caches: the prescale, the square and the row sums
        of a block of rows follow each other on cached data, and so do the update's row scaling, decay and
        addition. (The Sinkhorn iteration could also read A once per iteration, each block giving its row
        sums and then its share of the column sums while cached, but on a 2-core CPU the many small ops of
        that form made the step slower than whole-matrix mat-vecs: 0.93 vs 0.82 of AdamW(foreach) on the
        ``1b`` block.)"""
        step = max(1, CACHE_BLOCK // g.shape[1])
        blocks = [slice(start, start + step) for start in range(0, g.shape[0], step)]
        root = prescale_roots([g], A.dtype)
        q = root.square()[0]
        row_sums = torch.empty(g.shape[0], dtype=A.dtype, device=A.device)
        for b in blocks:
            torch.mul(g[b], q, out=A[b]).square_()
            torch.sum(A[b], dim=-1, out=row_sums[b])
        r, c = sinkhorn_square_scalings(A, group["iters"], group["eps"], row_sums=row_sums)
        r.mul_(root)
        c.mul_(root)
        if p.dtype != A.dtype or p.ndim != 2:  # low precision or flattened: the general update
            self.apply_updates(group, [p], [torch.mul(g, r.unsqueeze(-1), out=A)], factors=[c.unsqueeze(-2)])
            return
        lr, wd = group["lr"], group["weight_decay"]
        alpha = lr if group["maximize"] else -lr
        for b in blocks:
            rows = torch.mul(g[b], r[b].unsqueeze(-1), out=A[b])
            if wd != 0.0:
                p[b].mul_(1.0 - lr * wd)
            p[b].addcmul_(rows, c, value=alpha)
