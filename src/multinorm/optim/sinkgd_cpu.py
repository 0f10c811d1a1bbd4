"""SinkGD's step on one float32 CPU matrix as a compiled loop (numba), moving about the bytes its math needs.

With torch operations the step materialises ``A = (qG)^2`` and reads it in ``2L - 1`` mat-vecs, because the
column sums of an iteration need the row factors that the same iteration has just computed. A loop over rows
needs ``G`` only once per iteration: row i's sum ``(A v)_i`` gives its new factor ``u_i``, and while the row
is still in cache it adds ``u_i A_i`` to the column sums. Iteration 0 needs no prescale q: its share
``u_i (qG_ij)^2 = n G_ij^2 / sum_j G_ij^2`` is scale-free, so it reads G unscaled, and q (a power of four)
comes from its row sums afterwards. Reads of G: L for the iterations and one for the update, which writes the
weight in the same pass. No m x n buffer is allocated: the transient memory is four vectors (and one row of
column sums per block for a matrix stepped by blocks of rows, below). (Rows whose raw
sum of squares leaves [2^-100, 2^100], i.e. a gradient near float32's under- or overflow, are summed again on
qG, and the column sums with them when such a row had already contributed: a rare extra read.)

Threads: a batch of same-shape matrices is dealt out whole to ``torch.get_num_threads()`` threads (the loop
releases the GIL), each stepping its matrices with its own work vectors. A matrix larger than
``BLOCK_ENTRIES`` is stepped by blocks of rows (:func:`row_blocks`), each block summing its share of the
column sums apart, added in block order after each sweep; when there are fewer such matrices than threads
(the 1B block's single down projection), the blocks of one matrix are spread over all threads. How a matrix
is split depends on its shape only, so its numbers do not depend on the thread count. A single core's
passes are limited by how fast it streams reads (a read-only stream is slower than one that also writes,
``make bench``'s ``bandwidth.csv``), and by arithmetic where the matrices sit in cache.

The arithmetic is :func:`multinorm.normalize.sinkhorn_square_scalings`' in float32, step for step (the
same floors and update; the prescale, an exact power of four, may differ by a factor that cancels); sums are
accumulated in another order, so results agree to float32 rounding. ``tests/test_optim.py`` compares the two paths and both with the float64 reference.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["usable", "sinkgd_matrix_step", "row_blocks", "BLOCK_ENTRIES", "MIN_SHARE_ENTRIES"]

# reassociation lets LLVM vectorise the sums; no finite-math assumption, so a nan/inf gradient propagates
# as it does through torch's operations
_FAST = {"reassoc", "contract"}


def usable(param: Tensor, grad: Tensor) -> bool:
    """Whether the compiled step applies: eager mode on CPU, a contiguous float32 matrix and gradient."""
    return (param.device.type == "cpu" and param.dtype == torch.float32 and grad.dtype == torch.float32
            and param.ndim == 2 and grad.ndim == 2 and param.is_contiguous() and grad.is_contiguous()
            and not torch.compiler.is_compiling())


# A matrix of more entries than this is stepped in blocks of rows (row_blocks): 4 MiB of float32, so that a
# 1B model's 2048 x 5461 matrix gives its threads 11 blocks, while every matrix of the small models is one.
BLOCK_ENTRIES = 1 << 20
# A batch uses a helper thread only for every this many entries it holds: handing a few small matrices to a
# second thread costs more than it saves (measured on 2 cores: a `nano` batch of 16 128 x 128 matrices steps
# in 0.85x the time with 2 threads; `micro`'s 16 256 x 256, 1.3x faster).
MIN_SHARE_ENTRIES = 1 << 18


def row_blocks(m: int, n: int, block_entries: int) -> list[tuple[int, int]]:
    """The row ranges [a, b) in which an m x n matrix is stepped: one for a matrix of at most ``block_entries``
    entries, else about ``m n / block_entries`` ranges of equal size (a multiple of 4 rows, the sweeps' unit).
    A function of the shape only, so the numbers of a step do not depend on how many threads run it."""
    k = min(-(-m * n // block_entries), -(-m // 4))
    if k <= 1:
        return [(0, m)]
    size = -(-m // k)
    size += -size % 4
    return [(a, min(a + size, m)) for a in range(0, m, size)]


def sinkgd_matrix_step(params: list[Tensor], grads: list[Tensor], iters: int, eps: float, lr: float,
                       weight_decay: float, maximize: bool, threads: int | None = None,
                       block_entries: int | None = None, min_share_entries: int | None = None) -> None:
    """``W <- W (1 - lr wd) -/+ lr SR-Sinkhorn(G)`` in place, for each of a list of same-shape matrices
    (:func:`usable`), on up to ``threads`` threads (default ``torch.get_num_threads()``; one per
    ``MIN_SHARE_ENTRIES`` entries of the batch at most).

    Whole matrices are dealt out to the threads, each stepping its share one matrix after the other; the
    matrices left over when there are fewer than threads (a single large matrix, say) are each stepped by
    all threads at once, block of rows by block of rows (:func:`row_blocks`; every block keeps its own
    column sums, added in block order after each sweep). Every matrix gets the same numbers, bit for bit,
    at any thread count: how a matrix is split depends on its shape only."""
    threads = max(1, torch.get_num_threads() if threads is None else threads)
    pairs = [(grad.numpy(), param.detach().numpy()) for param, grad in zip(params, grads)]
    scalars = (np.float32(eps * eps), np.float32(lr if maximize else -lr), np.float32(1.0 - lr * weight_decay))
    m, n = pairs[0][0].shape
    smallest = MIN_SHARE_ENTRIES if min_share_entries is None else max(1, min_share_entries)
    threads = min(threads, max(1, len(pairs) * m * n // smallest))
    blocks = row_blocks(m, n, BLOCK_ENTRIES if block_entries is None else block_entries)
    whole = len(pairs) - len(pairs) % threads if len(blocks) > 1 else len(pairs)
    shares = [pairs[k:whole:threads] for k in range(min(threads, whole))]
    if len(shares) > 1:
        futures = [_pool(len(shares) - 1).submit(_step_share, share, iters, scalars, blocks) for share in shares[1:]]
        _step_share(shares[0], iters, scalars, blocks)
        for future in futures:
            future.result()
    elif shares:
        _step_share(shares[0], iters, scalars, blocks)
    for G, W in pairs[whole:]:  # fewer large matrices than threads: each on all of them
        _step_blocked(G, W, iters, scalars, blocks, _work(G.shape, len(blocks)), threads)


def _work(shape: tuple[int, int], nblocks: int) -> tuple[np.ndarray, ...]:
    # separate allocations (LLVM vectorises loops over arrays it cannot prove overlapping less well), made by
    # torch so that memory probes see them, shared by the matrices a thread steps: at the small sizes of a
    # debug model the allocations and conversions cost as much as the loop itself. ``parts``: one row of
    # column sums per block of rows (none for a matrix stepped whole)
    m, n = shape
    u, rows, v, col = (torch.empty(size, dtype=torch.float32).numpy() for size in (m, m, n, n))
    parts = torch.empty((nblocks if nblocks > 1 else 0, n), dtype=torch.float32).numpy()
    return u, rows, v, col, parts


def _step_share(pairs: list[tuple[np.ndarray, np.ndarray]], iters: int, scalars: tuple,
                blocks: list[tuple[int, int]]) -> None:
    work = _work(pairs[0][0].shape, len(blocks))
    for G, W in pairs:
        if len(blocks) == 1:
            _step(G, W, iters, *scalars, *work[:4])
        else:
            _step_blocked(G, W, iters, scalars, blocks, work, 1)


def _step_blocked(G: np.ndarray, W: np.ndarray, iters: int, scalars: tuple, blocks: list[tuple[int, int]],
                  work: tuple[np.ndarray, ...], threads: int) -> None:
    """:func:`_step` by blocks of rows, the blocks of each sweep spread over ``threads`` threads: each block
    sums its rows' shares into its own row of ``parts``, which are added in block order between sweeps."""
    eps2, alpha, decay = scalars
    u, rows, v, col, parts = work

    def each_block(kernel, *args):
        def share(first: int) -> None:
            for k in range(first, len(blocks), threads):
                kernel(k, *blocks[k], *args)

        if threads == 1:
            return share(0)
        futures = [_pool(threads - 1).submit(share, t) for t in range(1, min(threads, len(blocks)))]
        share(0)
        for future in futures:
            future.result()

    each_block(lambda k, a, b: _first_sweep(G[a:b], u[a:b], rows[a:b], parts[k]))
    _sum_parts(parts, col)
    root = np.float32(_first_factors(G, u, rows, v, col, eps2))  # numba hands back a Python float
    q = root * root
    for _ in range(1, iters):
        each_block(lambda k, a, b: _sweep(G[a:b], q, v, u[a:b], parts[k], eps2))
        _sum_parts(parts, col)
        _next_v(v, col, eps2, G.shape[0])
    _final_v(v, root)
    each_block(lambda k, a, b: _update_rows(G[a:b], W[a:b], u[a:b], v, root, alpha, decay))


_POOL: tuple[ThreadPoolExecutor, int] | None = None  # (the executor, its number of threads)
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process's helper threads for :func:`sinkgd_matrix_step`, at least ``workers`` of them."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[1] < workers:
            if _POOL is not None:
                _POOL[0].shutdown(wait=True)
            _POOL = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sinkgd"), workers)
        return _POOL[0]


def _forget_pool() -> None:  # a forked child has none of its parent's threads: it starts its own pool
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _step(G, W, iters, eps2, alpha, decay, u, rows, v, col):  # pragma: no cover (compiled)
    # Pass 1 reads G unscaled: row sums of G^2, and from the same cached rows the column sums of iteration 0
    _first_sweep(G, u, rows, col)
    root = _first_factors(G, u, rows, v, col, eps2)
    q = root * root
    for _ in range(1, iters):
        _sweep(G, q, v, u, col, eps2)
        _next_v(v, col, eps2, G.shape[0])
    _final_v(v, root)
    _update_rows(G, W, u, v, root, alpha, decay)


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _first_factors(G, u, rows, v, col, eps2):  # pragma: no cover (compiled)
    """After :func:`_first_sweep`: the prescale root (returned), iteration 0's row factors u and column
    factors v, and the column sums of the rows the first sweep could not add (out of range: summed again
    on qG; rare)."""
    m, n = G.shape
    zero, one = np.float32(0.0), np.float32(1.0)
    fm, fn = np.float32(m), np.float32(n)
    low = fn * _FLOOR
    root = _prescale_root(G, rows)
    q = root * root
    q2 = q * q
    # u_i = n / R_i (> 0) marks a row whose share u_i q^2 G_i^2 is in the column sums. A row whose raw sum is
    # out of range is summed again on qG; if it had added a share, or if a floor changes a factor after its
    # share was added, every share is taken again on qG (undoing a share would cancel catastrophically).
    redo = False
    total = zero
    for i in range(m):
        s = q2 * rows[i]
        if not (_in_range(rows[i]) and _in_range(s)):
            s = zero
            for j in range(n):
                x = q * G[i, j]
                s += x * x
            redo = redo or u[i] != zero
            u[i] = zero
        rows[i] = s
        total += s
    # u starts at k (the unit-RMS scale of the literal form), so iteration 0's floor is eps^2 / k
    k = np.float32(fm * fn) / total if total > zero else one
    floor0 = max(eps2 / k, low)
    for i in range(m):
        if rows[i] < floor0:  # a (near-)zero row: its factor is the floored one
            redo = redo or u[i] != zero
            u[i] = -(fn / floor0)
        elif u[i] > zero:
            u[i] = fn / rows[i]  # = (n / R_i) / q^2 exactly
        else:
            u[i] = -(fn / max(rows[i], low))
    if redo:
        for j in range(n):
            col[j] = zero
    for i in range(m):  # the shares not yet in the column sums (< 0), or all of them
        if redo or u[i] < zero:
            ui = u[i] = abs(u[i])
            for j in range(n):
                x = q * G[i, j]
                col[j] += ui * (x * x)
    for j in range(n):
        v[j] = fm / max(col[j], eps2, fm * _FLOOR)  # v started at 1
    return root


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _sum_parts(parts, col):  # pragma: no cover (compiled)
    """``col = sum_k parts[k]``, in block order."""
    for j in range(col.shape[0]):
        col[j] = parts[0, j]
    for k in range(1, parts.shape[0]):
        for j in range(col.shape[0]):
            col[j] += parts[k, j]


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _next_v(v, col, eps2, m):  # pragma: no cover (compiled)
    """The column factors of an m-row matrix from the column sums of an iteration, floored relative to the
    previous factors."""
    fm = np.float32(m)
    low = fm * _FLOOR
    for j in range(v.shape[0]):
        v[j] = fm / max(col[j], eps2 / v[j], low)


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _final_v(v, root):  # pragma: no cover (compiled)
    """The column factors of G itself: sqrt(q) into each."""
    for j in range(v.shape[0]):
        v[j] = np.sqrt(v[j]) * root


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _update_rows(G, W, u, v, root, alpha, decay):  # pragma: no cover (compiled)
    """``W <- W decay + alpha Diag(sqrt(u) root) G Diag(v)``, row by row (v already :func:`_final_v`). G is
    multiplied first: the factors of a zero row or column can be as large as 2^63 root, and their product
    would overflow where the entry they scale is zero."""
    m, n = G.shape
    for i in range(m):
        ri = alpha * (np.sqrt(u[i]) * root)
        for j in range(n):
            W[i, j] = W[i, j] * decay + (ri * G[i, j]) * v[j]


_LOW, _HIGH = np.float32(2.0 ** -100), np.float32(2.0 ** 100)
# the smallest denominator of a factor update, per target unit (normalize.FACTOR_FLOOR)
_FLOOR = np.float32(2.0 ** -126)


@numba.njit(cache=True, nogil=True)
def _in_range(x):  # pragma: no cover (compiled)
    """A sum of squares that is exact to float32 rounding, and whose reciprocal times n stays finite."""
    return _LOW <= x <= _HIGH


@numba.njit(cache=True, nogil=True)
def _prescale_root(G, rows):  # pragma: no cover (compiled)
    """``sqrt(q)``, q the power of four that brings the largest row of qG to norm (1/4, 1] (so that every
    square of qG is at most 1) from the raw row sums; from G's largest entry (one more read) when those sums
    are out of range (an overflowed or vanishing G), as :func:`multinorm.normalize.unit_max_root` does."""
    top = np.float32(0.0)
    for i in range(rows.shape[0]):
        top = max(top, rows[i])
    if _in_range(top):
        largest = np.sqrt(np.float64(top))
    else:
        largest = 0.0
        for i in range(G.shape[0]):
            for j in range(G.shape[1]):
                largest = max(largest, abs(np.float64(G[i, j])))
    _, e = math.frexp(largest)  # largest = f 2^e, f in [1/2, 1)
    half = max((e + (e & 1)) // 2, -63)
    return np.float32(math.ldexp(1.0, -half))


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _first_sweep(G, t, rows, col):  # pragma: no cover (compiled)
    """Iteration 0 on raw G (v = 1): ``rows_i = sum_j G_ij^2``, ``t_i = n / rows_i`` (0 where rows_i is out of
    range) and ``col_j = sum_i t_i G_ij^2``. ``t_i G_ij^2`` is scale-free: it equals ``u_i (qG_ij)^2`` for
    every power of four q, so the prescale is not needed yet, and the pass that finds it is saved."""
    m, n = G.shape
    zero = np.float32(0.0)
    fn = np.float32(n)
    for j in range(n):
        col[j] = zero
    tail = m - m % 4
    for i in range(0, tail, 4):
        a, b, c, d = G[i], G[i + 1], G[i + 2], G[i + 3]
        sa = sb = sc = sd = zero
        for j in range(n):
            sa += a[j] * a[j]
            sb += b[j] * b[j]
            sc += c[j] * c[j]
            sd += d[j] * d[j]
        rows[i], rows[i + 1], rows[i + 2], rows[i + 3] = sa, sb, sc, sd
        ta = fn / sa if _in_range(sa) else zero
        tb = fn / sb if _in_range(sb) else zero
        tc = fn / sc if _in_range(sc) else zero
        td = fn / sd if _in_range(sd) else zero
        t[i], t[i + 1], t[i + 2], t[i + 3] = ta, tb, tc, td
        if ta != zero and tb != zero and tc != zero and td != zero:
            for j in range(n):
                col[j] += (ta * (a[j] * a[j]) + tb * (b[j] * b[j])) + (tc * (c[j] * c[j]) + td * (d[j] * d[j]))
        else:  # a row out of range adds nothing here (its squares may be inf); its share is added after
            for r in range(i, i + 4):
                _add_row(G[r], t[r], col)
    for i in range(tail, m):
        g = G[i]
        s = zero
        for j in range(n):
            s += g[j] * g[j]
        rows[i] = s
        t[i] = fn / s if _in_range(s) else zero
        _add_row(g, t[i], col)


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _add_row(g, t, col):  # pragma: no cover (compiled)
    if t != np.float32(0.0):
        for j in range(g.shape[0]):
            col[j] += t * (g[j] * g[j])


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _sweep(G, q, v, u, col, eps2):  # pragma: no cover (compiled)
    """One read of G: each row's sum ``(A v)_i`` gives its factor ``u_i``, then, the row still in cache,
    ``u_i A_i`` is added to the column sums ``col``. Rows go four at a time, so that the loads of ``v`` and
    ``col`` and the loop overhead are shared by four rows."""
    m, n = G.shape
    zero = np.float32(0.0)
    fn = np.float32(n)
    low = fn * _FLOOR
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
        ui = fn / max(s, eps2 / u[i], low)
        u[i] = ui
        for j in range(n):
            x = q * g[j]
            col[j] += ui * (x * x)
