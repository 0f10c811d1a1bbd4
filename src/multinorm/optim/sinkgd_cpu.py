"""SinkGD's step on one float32 CPU matrix as a compiled loop (numba), moving about the bytes its math needs.

With torch operations the step materialises ``A = (qG)^2`` and reads it in ``2L - 1`` mat-vecs, because the
column sums of an iteration need the row factors that the same iteration has just computed. A loop over rows
needs ``G`` only once per iteration: row i's sum ``(A v)_i`` gives its new factor ``u_i``, and while the row
is still in cache it adds ``u_i A_i`` to the column sums (iteration 0's row sums come from the same pass).
Reads of G: one for its largest entry (torch's aminmax), L for the iterations and one for the update, which
writes the weight in the same pass. No m x n buffer is allocated: the transient memory is four vectors.

The loop runs on one core, matrix after matrix, whatever torch's thread count: it is written for the one-thread
case (``make bench``, and the studies' one-thread worker processes), where its passes are limited by arithmetic
about as much as by memory; with many idle cores, torch's multi-threaded operations (``SinkGD(..., fused=False)``)
can be faster on large matrices.

The arithmetic is :func:`multinorm.normalize.sinkhorn_square_scalings`' in float32, step for step (the
same prescale, floors and update); sums are accumulated in another order, so results agree to float32
rounding. ``tests/test_optim.py`` compares the two paths and both with the float64 reference.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["usable", "sinkgd_matrix_step"]

# reassociation lets LLVM vectorise the sums; no finite-math assumption, so a nan/inf gradient propagates
# as it does through torch's operations
_FAST = {"reassoc", "contract"}


def usable(param: Tensor, grad: Tensor) -> bool:
    """Whether the compiled step applies: eager mode on CPU, a contiguous float32 matrix and gradient."""
    return (param.device.type == "cpu" and param.dtype == torch.float32 and grad.dtype == torch.float32
            and param.ndim == 2 and grad.ndim == 2 and param.is_contiguous() and grad.is_contiguous()
            and not torch.compiler.is_compiling())


def sinkgd_matrix_step(param: Tensor, grad: Tensor, root: Tensor, iters: int, eps: float, lr: float,
                       weight_decay: float, maximize: bool) -> None:
    """``W <- W (1 - lr wd) -/+ lr SR-Sinkhorn(G)`` in place, for one matrix (:func:`usable`), given ``root``
    = ``sqrt(q)`` (1,) of the exact prescale (:func:`multinorm.optim.base.prescale_roots`)."""
    m, n = grad.shape
    # four separate allocations (LLVM vectorises loops over arrays it cannot prove overlapping less well), made
    # by torch so that memory probes see them
    u, rows, v, col = (torch.empty(size, dtype=torch.float32).numpy() for size in (m, m, n, n))
    alpha = lr if maximize else -lr
    _step(grad.numpy(), param.detach().numpy(), root.numpy(), iters, np.float32(eps * eps),
          np.float32(alpha), np.float32(1.0 - lr * weight_decay), u, rows, v, col)


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _step(G, W, root, iters, eps2, alpha, decay, u, rows, v, col):  # pragma: no cover (compiled)
    m, n = G.shape
    zero, one = np.float32(0.0), np.float32(1.0)
    big = np.float32(np.finfo(np.float32).max)
    fm, fn = np.float32(m), np.float32(n)
    r0 = root[0]
    q = r0 * r0
    # Pass 1: row sums of A = (qG)^2 (iteration 0's row step) and, from the same cached rows, iteration 0's
    # column sums. The row factor's eps floor needs the total of all rows (unknown yet), so the rows are
    # added with the floor n / big only; the rows under the full floor are corrected after.
    for j in range(n):
        v[j] = one
    _sweep(G, q, v, u, rows, col, True, eps2)
    total = zero
    for i in range(m):
        total += rows[i]
    # u starts at k (the unit-RMS scale of the literal form), so iteration 0's floor is eps^2 / k
    k = np.float32(fm * fn) / total if total > zero else one
    floor0 = max(eps2 / k, fn / big)
    for i in range(m):
        if rows[i] < floor0:  # a (near-)zero row: its factor is the floored one
            ui = fn / floor0
            d = ui - u[i]
            u[i] = ui
            for j in range(n):
                x = q * G[i, j]
                col[j] += d * (x * x)
    for j in range(n):
        v[j] = fm / max(col[j], eps2, fm / big)  # v started at 1
    for _ in range(1, iters):
        _sweep(G, q, v, u, rows, col, False, eps2)
        for j in range(n):
            v[j] = fm / max(col[j], eps2 / v[j], fm / big)
    for j in range(n):  # the factors of G itself: sqrt(q) into each
        v[j] = np.sqrt(v[j]) * r0
    for i in range(m):
        ri = alpha * (np.sqrt(u[i]) * r0)
        for j in range(n):
            W[i, j] = W[i, j] * decay + ri * v[j] * G[i, j]


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _sweep(G, q, v, u, rows, col, first, eps2):  # pragma: no cover (compiled)
    """One read of G: each row's sum ``(A v)_i`` gives its factor ``u_i``, then, the row still in cache,
    ``u_i A_i`` is added to the column sums ``col``. Rows go four at a time, so that the loads of ``v`` and
    ``col`` and the loop overhead are shared by four rows."""
    m, n = G.shape
    zero = np.float32(0.0)
    fn = np.float32(n)
    low = fn / np.float32(np.finfo(np.float32).max)
    for j in range(n):
        col[j] = zero
    tail = m - m % 4
    for i in range(0, tail, 4):
        a, b, c, d = G[i], G[i + 1], G[i + 2], G[i + 3]
        sa = sb = sc = sd = zero
        for j in range(n):
            w = v[j]
            xa, xb, xc, xd = q * a[j], q * b[j], q * c[j], q * d[j]
            sa += (xa * xa) * w
            sb += (xb * xb) * w
            sc += (xc * xc) * w
            sd += (xd * xd) * w
        if first:
            rows[i], rows[i + 1], rows[i + 2], rows[i + 3] = sa, sb, sc, sd
            ua, ub = fn / max(sa, low), fn / max(sb, low)
            uc, ud = fn / max(sc, low), fn / max(sd, low)
        else:
            ua, ub = fn / max(sa, eps2 / u[i], low), fn / max(sb, eps2 / u[i + 1], low)
            uc, ud = fn / max(sc, eps2 / u[i + 2], low), fn / max(sd, eps2 / u[i + 3], low)
        u[i], u[i + 1], u[i + 2], u[i + 3] = ua, ub, uc, ud
        for j in range(n):  # the rows again, from cache: squaring twice is cheaper than storing the squares
            xa, xb, xc, xd = q * a[j], q * b[j], q * c[j], q * d[j]
            col[j] += (ua * (xa * xa) + ub * (xb * xb)) + (uc * (xc * xc) + ud * (xd * xd))
    for i in range(tail, m):
        g = G[i]
        s = zero
        for j in range(n):
            x = q * g[j]
            s += (x * x) * v[j]
        if first:
            rows[i] = s
            ui = fn / max(s, low)
        else:
            ui = fn / max(s, eps2 / u[i], low)
        u[i] = ui
        for j in range(n):
            x = q * g[j]
            col[j] += ui * (x * x)
