r"""Gradient normalization operators P_g and their alternating composition (MultiNorm).

Every function takes a gradient ``G`` of shape ``(..., m, n)`` -- one matrix or a batch of matrices over
the leading dims -- computes in float32 (float64 when given float64) and returns the input dtype.

Convention (PyTorch ``nn.Linear.weight`` is ``[out_features, in_features]``): ``m = out_features`` and a
*row* is an output unit, normalised across its ``n = in_features`` entries (``dim=-1``, target l2 norm
``sqrt(n)``); a *column* is an input feature, normalised across ``dim=-2`` to ``sqrt(m)``. With
``Q(X) = Diag(row norms)``, ``R(X) = Diag(column norms)`` and the thin SVD ``X = U S V^T``:

    row_normalize(X)       = sqrt(n) Q(X)^{-1} X              every row has norm sqrt(n)
    col_normalize(X)       = sqrt(m) X R(X)^{-1}              every column has norm sqrt(m)
    spectral_normalize(X)  = sqrt(max(m, n)) U V^T            (= sqrt(n) (X X^T)^{-1/2} X when m <= n)
    frobenius_normalize(X) = sqrt(mn) X / ||X||_F
    sign_normalize(X)      = sign(X)
    gradnorm(X)            = Diag(s)^{-1} (X - xbar 1^T)       row mean xbar, population row std s (SWAN)
    whiten(X)              = (X X^T)^{-1/2} X = U V^T          polar factor (SWAN's GradWhitening)
    sr_sinkhorn(X, L)      = (col_normalize o row_normalize)^L (X)        (SinkGD's SR-Sinkhorn)

Each normalisation is the steepest direction of a norm, ``P_g(X) = argmax_{g(Z) <= 1} <X, Z>``, scaled so
that ``||P_g(X)||_F = sqrt(mn)`` (entry RMS 1). MultiNorm (Algorithm 1 of the Gradient Multi-Normalization
paper, arXiv 2502.06742) applies a sequence of them ``L`` times; SWAN (arXiv 2412.13148) is the instance
(gradnorm, spectral) with ``L = 1`` and SinkGD the instance (row, col) with ``L = 5``.

Numerics. All operators are invariant to a positive global scale of ``G``, so each one first rescales the
matrix to unit entry RMS (dividing by its largest absolute entry first, so squares cannot overflow or
underflow: gradients from 1e-30 to 1e30 give the same direction). ``eps`` therefore acts on norms of a
unit-RMS matrix, whose rows have norm ~sqrt(n). Norms are clamped below at ``eps`` (squared norms at
``eps**2``), so zero rows/columns stay zero and an all-zero gradient maps to a zero update. Non-finite
inputs give non-finite outputs. No operator synchronises with the host (no branch on tensor values), so
they queue on an accelerator without stalls and compile with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "FACTOR_FLOOR",
    "DEFAULT_EPS",
    "NORMALIZERS",
    "row_normalize",
    "col_normalize",
    "frobenius_normalize",
    "sign_normalize",
    "spectral_normalize",
    "gradnorm",
    "whiten",
    "whiten_nsds",
    "sr_sinkhorn",
    "sr_sinkhorn_naive",
    "sr_sinkhorn_scalings",
    "sinkhorn_squares",
    "scale_to_unit_max",
    "unit_max_root",
    "sinkhorn_square_scalings",
    "multi_normalize",
    # the pieces of the whitening that SWAN's fused step composes (multinorm.optim.swan)
    "gram",
    "newton_schulz_z",
    "nsds_z",
    "fixed_point_scale",
    "polar_exact",
]

DEFAULT_EPS = 1e-8
# The smallest denominator, per unit of target, in a Sinkhorn factor update: an exactly-zero row or column
# (whose floored factor grows by n / eps^2 per iteration) stops at the factor 2^126, exactly, instead of
# overflowing; its square root 2^63 times any prescale root stays finite, and it multiplies zeros only.
FACTOR_FLOOR = 2.0 ** -126

Normalizer = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------------------
# helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(G: Tensor, fn: str) -> None:
    if not isinstance(G, Tensor):
        raise TypeError(f"{fn} expects a torch.Tensor, got {type(G).__name__}")
    if G.ndim < 2:
        raise ValueError(
            f"{fn} expects a matrix or a batch of matrices of shape (..., m, n); "
            f"got a {G.ndim}-D tensor of shape {tuple(G.shape)}"
        )
    if not G.is_floating_point():
        raise ValueError(f"{fn} expects a floating-point tensor (float16/bfloat16/float32/float64); got {G.dtype}")


def _max_abs(G: Tensor) -> Tensor:
    """Largest |entry| per matrix, shape (..., 1, 1), in the compute dtype; 1 for an all-zero matrix."""
    s = _abs_max(G).to(_compute_dtype(G.dtype))
    return torch.where(s > 0, s, torch.ones_like(s))


def _abs_max(G: Tensor) -> Tensor:
    """Largest |entry| per matrix, shape (..., 1, 1), in G's dtype (0 for an all-zero matrix)."""
    # one vectorised pass (aminmax) where the matrix can be flattened without a copy; amax/amin otherwise
    # (vector_norm(ord=inf) is several times slower on CPU)
    if G.is_contiguous():
        lo, hi = torch.aminmax(G.reshape(*G.shape[:-2], -1), dim=-1, keepdim=True) if G.ndim > 2 else torch.aminmax(G)
        return torch.maximum(hi, lo.neg()).reshape(*G.shape[:-2], 1, 1)
    return torch.maximum(G.amax(dim=(-2, -1), keepdim=True), G.amin(dim=(-2, -1), keepdim=True).neg())


def unit_max_root(max_abs: Tensor, dtype: torch.dtype) -> Tensor:
    r"""``sqrt(q)`` in ``dtype`` for the power of four ``q = 4^-e`` with ``max_abs * q`` in (1/4, 1] (q = 1 for 0).

    Scaling by q (or sqrt(q)) is exact, and keeps products and squares of the scaled matrix in range for
    any gradient scale; q stays finite for subnormal ``max_abs``.
    """
    _, e = torch.frexp(max_abs.to(dtype))  # max_abs = f 2^e, f in [1/2, 1)
    max_exponent = int(math.log2(torch.finfo(dtype).max)) + 1  # 128 for float32
    half = torch.div(e + (e & 1), 2, rounding_mode="floor").clamp_(min=1 - max_exponent // 2)  # e rounded up to even
    return torch.ldexp(torch.ones_like(half, dtype=dtype), half.neg_())


def scale_to_unit_max(G: Tensor, out: Tensor) -> Tensor:
    r"""Write ``q G`` into ``out`` (G's shape, any float dtype) and return ``sqrt(q)``, shape (..., 1), with q
    :func:`unit_max_root`'s exact power of four (``max |q G|`` in (1/4, 1]). Costs one read of G (its
    largest entry) and one pass writing ``out``; no host synchronisation.
    """
    root = unit_max_root(_abs_max(G), out.dtype)  # (..., 1, 1)
    torch.mul(G, root.square(), out=out)
    return root.squeeze(-1)


def _prescaled(G: Tensor) -> Tensor:
    """G / max|G| in the compute dtype (a new tensor; G is never modified)."""
    return torch.div(G, _max_abs(G))


def _unit_rms(G: Tensor) -> Tensor:
    """G rescaled to entry RMS 1 (||X||_F = sqrt(mn)) in the compute dtype; zero stays zero.

    Dividing by max|G| first keeps the squares inside the float range for any gradient scale.
    """
    X = _prescaled(G)
    rms = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) / math.sqrt(G.shape[-2] * G.shape[-1])
    return X.div_(torch.where(rms > 0, rms, torch.ones_like(rms)))


def _eye_like(A: Tensor) -> Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)


# ----------------------------------------------------------------------------------------------------------
# single-norm operators


def row_normalize(G: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    r"""Row normalisation ``sqrt(n) Q(G)^{-1} G``: each output unit (row) gets l2 norm ``sqrt(n)``.

    Steepest direction of ``g_row(W) = max_i ||W_i,:||_2 / sqrt(n)``. Row norms below ``eps`` (G taken at
    unit entry RMS) are clamped, so zero rows stay zero. Cost: ~5 mn flops, one m x n buffer.
    """
    _check(G, "row_normalize")
    X = _unit_rms(G)
    norms = torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min_(eps)
    return X.mul_(math.sqrt(G.shape[-1]) / norms).to(G.dtype)


def col_normalize(G: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    r"""Column normalisation ``sqrt(m) G R(G)^{-1}``: each input feature (column) gets l2 norm ``sqrt(m)``.

    Steepest direction of ``g_col(W) = max_j ||W_:,j||_2 / sqrt(m)``. Cost: ~5 mn flops, one m x n buffer.
    """
    _check(G, "col_normalize")
    X = _unit_rms(G)
    norms = torch.linalg.vector_norm(X, dim=-2, keepdim=True).clamp_min_(eps)
    return X.mul_(math.sqrt(G.shape[-2]) / norms).to(G.dtype)


def frobenius_normalize(G: Tensor) -> Tensor:
    r"""``sqrt(mn) G / ||G||_F`` (entry RMS 1; zero stays zero). Cost: ~4 mn flops."""
    _check(G, "frobenius_normalize")
    return _unit_rms(G).to(G.dtype)


def sign_normalize(G: Tensor) -> Tensor:
    r"""``sign(G)``: steepest direction of the max-entry norm ``g_inf(W) = max_ij |W_ij|`` ("Adam without
    EMA"). Zeros stay zero, so ``||sign(G)||_F = sqrt(nnz)``. Cost: mn."""
    _check(G, "sign_normalize")
    return torch.sign(G)


def gradnorm(G: Tensor, center: bool = True, eps: float = DEFAULT_EPS) -> Tensor:
    r"""SWAN's GradNorm: standardise every row over its n entries (``dim=-1``).

        gbar = (1/n) G 1_n,   s = sqrt((1/n) sum_j (G_:,j - gbar)^2),   GradNorm(G) = Diag(s + eps)^{-1} (G - gbar 1^T)

    The std is the population one (1/n). Each row then has mean 0 and norm sqrt(n), so
    ``||GradNorm(G)||_F = sqrt(mn)``. With ``center=False`` the mean is not removed and ``s`` is the row RMS,
    which is ``row_normalize`` up to where eps enters (G is taken at unit entry RMS, so eps is relative).
    Cost: ~7 mn flops, one m x n buffer.
    """
    _check(G, "gradnorm")
    X = _unit_rms(G)
    if center:
        X.sub_(X.mean(dim=-1, keepdim=True))
    std = X.square().mean(dim=-1, keepdim=True).sqrt_()
    return X.div_(std.add_(eps)).to(G.dtype)


# ----------------------------------------------------------------------------------------------------------
# whitening (polar factor) and the spectral operator


def polar_exact(X: Tensor) -> Tensor:
    """U V^T from a thin SVD, dropping singular values at round-off level (pseudo-inverse convention). The SVD
    reads its solver status on the host: a call synchronises with the device."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    tol = S.amax(dim=-1, keepdim=True) * max(X.shape[-2:]) * torch.finfo(S.dtype).eps
    keep = (S > tol).to(U.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def gram(X: Tensor) -> tuple[Tensor, Tensor]:
    """Y0 = A / ||A||_F with A = X X^T, and ||A||_F (shape (..., 1, 1), >= tiny)."""
    A = X @ X.mT
    norm = torch.linalg.vector_norm(A, dim=(-2, -1), keepdim=True).clamp_min_(torch.finfo(A.dtype).tiny)
    return A.div_(norm), norm


def fixed_point_scale(beta: float, gram_norm: Tensor) -> Tensor:
    # An eigenvalue a of Y0 has z <- beta (3 - a z^2) z with fixed point a z*^2 = 3 - 1/beta, so at the fixed
    # point Z X = sqrt((3 - 1/beta) ||A||_F) U V^T; dividing by it returns the polar factor itself.
    return ((3.0 - 1.0 / beta) * gram_norm).sqrt_()


def _check_beta(beta: float, fn: str) -> None:
    if not beta > 1.0 / 3.0:
        raise ValueError(f"{fn}: beta must be > 1/3 (otherwise the iteration has no positive fixed point); got {beta}")


def newton_schulz_z(Y: Tensor, steps: int, beta: float) -> Tensor | None:
    """Z of the coupled Newton-Schulz iteration on a normalised Gram matrix Y (None for steps = 0: Z = I)."""
    if steps == 0:
        return None
    # first step with Z0 = I spelled out: T = 3I - Y, Y <- beta Y T, Z <- beta T (saves two products)
    T = _eye_like(Y).mul(3.0).sub_(Y)
    Y = (Y @ T).mul_(beta)
    Z = T.mul_(beta)
    for _ in range(steps - 1):
        T = (Z @ Y).neg_()
        T.diagonal(dim1=-2, dim2=-1).add_(3.0)
        Y = (Y @ T).mul_(beta)
        Z = (T @ Z).mul_(beta)
    return Z


def _newton_schulz(X: Tensor, steps: int, beta: float) -> Tensor:
    """Coupled Newton-Schulz on the m x m Gram of X (m <= n), returning ~U V^T."""
    Y, gram_norm = gram(X)
    Z = newton_schulz_z(Y, steps, beta)
    ZX = X.clone() if Z is None else Z @ X
    return ZX.div_(fixed_point_scale(beta, gram_norm))


def nsds_z(Y: Tensor, steps: int, beta: float, diagonal_z: bool) -> Tensor | None:
    """NSDS on a normalised Gram matrix Y: the full Z of the last step, or the vector z = diag(Z) with
    ``diagonal_z`` (None for steps = 0: Z = I)."""
    if steps == 0:
        return None
    if diagonal_z:
        # only diag(Y) is ever read: diag(Y) <- beta diag(Y) (3 - z diag(Y)),  z <- beta z (3 - z diag(Y))
        y = Y.diagonal(dim1=-2, dim2=-1).clone()
        z = torch.ones_like(y)
        for _ in range(steps):
            t = 3.0 - z * y
            y = beta * y * t
            z = beta * z * t
        return z
    z = torch.ones(Y.shape[:-1], dtype=Y.dtype, device=Y.device)
    for _ in range(steps):
        t = 3.0 - z * Y.diagonal(dim1=-2, dim2=-1)
        Z = (z.unsqueeze(-1) * Y).neg_()
        Z.diagonal(dim1=-2, dim2=-1).add_(3.0)
        Z.mul_((beta * z).unsqueeze(-2))
        Y = Y * (beta * t).unsqueeze(-2)
        z = Z.diagonal(dim1=-2, dim2=-1).clone()
    return Z


def whiten(G: Tensor, steps: int = 10, beta: float = 0.8, method: str = "newton-schulz") -> Tensor:
    r"""GradWhitening ``(G G^T)^{-1/2} G = U V^T`` (polar factor; pseudo-inverse when rank deficient).

    Computed on the smaller side: for a tall G, ``G (G^T G)^{-1/2}`` via the transpose (same matrix).

    ``method="newton-schulz"`` runs the coupled iteration on the *normalised* Gram matrix (the raw Gram of a
    gradient has eigenvalues far outside the (0, 3) convergence region and diverges):

        A = G G^T,  Y0 = A / ||A||_F,  Z0 = I
        repeat steps times:  T = 3I - Z Y;   Y <- beta Y T;   Z <- beta T Z
        return Z G / sqrt((3 - 1/beta) ||A||_F)

    The final division is the scale of the iteration's fixed point, so a converged iteration returns
    ``U V^T`` exactly. beta = 1/2 is the classical, quadratically convergent choice (it under-whitens small
    singular values with few steps); SWAN's (steps=10, beta=0.8) grows small singular values x2.4 per step
    and lands them in a band around 1 rather than at 1. Cost, with m = min dim, n = max dim:
    ``4 m^2 n + 6 (steps - 1/3) m^3`` flops, three m x m buffers and one m x n fp32 copy.

    ``method="exact"`` uses a thin SVD (reference; singular values at round-off level are dropped).
    """
    _check(G, "whiten")
    if method not in ("newton-schulz", "exact"):
        raise ValueError(f"whiten: method must be 'newton-schulz' or 'exact', got {method!r}")
    if steps < 0:
        raise ValueError(f"whiten: steps must be >= 0, got {steps}")
    _check_beta(beta, "whiten")
    X = _prescaled(G)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    Q = polar_exact(X) if method == "exact" else _newton_schulz(X, steps, beta)
    if tall:
        Q = Q.mT
    return Q.contiguous().to(G.dtype)


def whiten_nsds(G: Tensor, steps: int = 2, beta: float = 0.4, diagonal_z: bool = False) -> Tensor:
    r"""NSDS whitening (Newton-Schulz with diagonal substitution), SWAN's fast variant (a reconstruction).

    Inside each Newton-Schulz step Z is replaced by its diagonal ``z = diag(Z)`` (``Z0 = I``):

        Y <- beta Y Diag(3 - z * diag(Y));    Z <- beta (3I - Diag(z) Y) Diag(z)
        return Z G / sqrt((3 - 1/beta) ||A||_F)            (same output scale convention as ``whiten``)

    Two readings exist; ``diagonal_z=False`` keeps the full Z of the last step for the output ``Z G``
    (cost ``4 m^2 n + O(steps m^2)``), ``diagonal_z=True`` keeps Z diagonal throughout, so the output is a
    row scaling ``Diag(z) G`` and only ``diag(G G^T)`` and ``||G G^T||_F`` are needed (cost ``2 m^2 n``).
    Defaults: 2 steps, beta 0.4. After GradNorm the result is close to GradNorm plus a first-order
    decorrelation, not U V^T.
    """
    _check(G, "whiten_nsds")
    if steps < 0:
        raise ValueError(f"whiten_nsds: steps must be >= 0, got {steps}")
    _check_beta(beta, "whiten_nsds")
    X = _prescaled(G)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    Y, gram_norm = gram(X)
    Z = nsds_z(Y, steps, beta, diagonal_z)
    del Y
    if Z is None:
        ZX = X.clone()
    elif diagonal_z:
        ZX = X * Z.unsqueeze(-1)
    else:
        ZX = Z @ X
    Q = ZX.div_(fixed_point_scale(beta, gram_norm))
    if tall:
        Q = Q.mT
    return Q.contiguous().to(G.dtype)


def spectral_normalize(G: Tensor, method: str = "exact", steps: int = 10, beta: float = 0.8) -> Tensor:
    r"""``sqrt(max(m, n)) U V^T``: steepest direction of ``||W||_op / sqrt(max(m, n))``.

    ``method`` selects the whitening: "exact" (SVD, default) or "newton-schulz" (see ``whiten``). At full
    rank the output has ``||.||_F = sqrt(mn)``. Cost: that of ``whiten`` plus mn.
    """
    _check(G, "spectral_normalize")
    X = whiten(G if G.dtype == torch.float64 else G.float(), steps=steps, beta=beta, method=method)
    return X.mul_(math.sqrt(max(G.shape[-2:]))).to(G.dtype)


# ----------------------------------------------------------------------------------------------------------
# SR-Sinkhorn


def sinkhorn_squares(G: Tensor, out: Tensor) -> Tensor:
    r"""Write ``A = (q G)^2`` into ``out`` (compute dtype, G's shape) and return ``sqrt(q)``, shape (..., 1).

    q is :func:`scale_to_unit_max`'s exact power of four, so the squares neither overflow nor underflow;
    the Sinkhorn factors of A are those of ``G * G`` up to the exact factor q^2, which the caller folds
    back as ``sqrt(q)`` into each of r and c. One read of G, one pass writing A, one squaring it in place.
    """
    root = scale_to_unit_max(G, out)
    out.square_()
    return root


def sinkhorn_square_scalings(A: Tensor, iters: int, eps: float,
                             row_sums: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Factors r (..., m), c (..., n) with ``SR-Sinkhorn(G) = Diag(r) G Diag(c)`` for ``A = G * G``.

    Iterates the Sinkhorn-Knopp scaling (u, v) of A with row targets n and column targets m (``2 iters``
    mat-vecs, the first being A's row sums), with eps applied as in the literal form at unit entry RMS.
    Reads A only; no host synchronisation. r and c hold the exact factors of the G that A squares.
    ``row_sums`` (..., m): A's row sums, if the caller already has them (saves the first pass).
    """
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    A = A.reshape(-1, m, n)  # (b, m, n); u, v are kept as (b, 1, m), (b, 1, n) row vectors for bmm
    At = A.mT
    # tensor constants: a Python scalar in each vector op costs more than the op itself at these sizes
    eps2, n_t, m_t = (torch.full((), value, dtype=A.dtype, device=A.device) for value in (eps * eps, n, m))
    row_sums = (A.sum(dim=-1) if row_sums is None else row_sums.reshape(-1, m)).unsqueeze(-2)
    total = row_sums.sum(dim=-1, keepdim=True)
    # k rescales A to mean 1, i.e. G to unit entry RMS, the scale at which the literal form applies eps.
    # The iteration runs on u' = k u, in which k cancels from both half-steps (A^T u' = k A^T u).
    k = torch.where(total > 0, (m * n) / total, torch.ones_like(total))  # (b, 1, 1)
    u = k.expand_as(row_sums)
    v = torch.ones(A.shape[0], 1, n, dtype=A.dtype, device=A.device)
    for it in range(iters):
        # Row step of the literal form: a row of X = Diag(sqrt u) G Diag(sqrt v) has squared norm
        # u * (kA v) and is multiplied by sqrt(n / max(u * kA v, eps^2)), so u <- n / max(kA v, eps^2 / u).
        # The denominator's floor (FACTOR_FLOOR) keeps the factor of an exactly-zero row finite, at 2^126
        # (it multiplies zeros only), so no inf or nan can arise.
        Av = row_sums if it == 0 else torch.bmm(v, At)
        u = torch.div(n_t, torch.maximum(Av, torch.div(eps2, u)).clamp_(min=n * FACTOR_FLOOR))
        v = torch.div(m_t, torch.maximum(torch.bmm(u, A), torch.div(eps2, v)).clamp_(min=m * FACTOR_FLOOR))
    return u.sqrt_().reshape(batch + (m,)), v.sqrt_().reshape(batch + (n,))


def _sinkhorn_factors(G: Tensor, iters: int, eps: float, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column factors r (..., m), c (..., n) with SR-Sinkhorn(G) = Diag(r) G Diag(c), plus the
    m x n compute-dtype work buffer (``out`` if given; free for reuse by the caller)."""
    cdt = _compute_dtype(G.dtype)
    if out is None:
        out = torch.empty(G.shape, dtype=cdt, device=G.device)
    elif out.shape != G.shape or out.dtype != cdt or not out.is_contiguous():
        raise ValueError(f"sr_sinkhorn: out must be a contiguous {cdt} tensor of shape {tuple(G.shape)}")
    root = sinkhorn_squares(G, out)
    r, c = sinkhorn_square_scalings(out, iters, eps)
    # r and c belong to qG; sqrt(q) goes into each, so neither overflows for tiny or huge G
    return r.mul_(root), c.mul_(root), out


def sr_sinkhorn_scalings(G: Tensor, iters: int = 5, eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
    r"""The positive vectors ``r`` (..., m) and ``c`` (..., n) with
    ``sr_sinkhorn(G, iters) = r[..., :, None] * G * c[..., None, :]`` (compute dtype)."""
    _check(G, "sr_sinkhorn_scalings")
    _check_iters(iters, "sr_sinkhorn_scalings")
    r, c, _ = _sinkhorn_factors(G, iters, eps)
    return r, c


def _check_iters(iters: int, fn: str) -> None:
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{fn}: iters must be a non-negative int, got {iters!r}")


def sr_sinkhorn(G: Tensor, iters: int = 5, eps: float = DEFAULT_EPS, method: str = "fast",
                out: Tensor | None = None) -> Tensor:
    r"""SR-Sinkhorn (Algorithm 3 of arXiv 2502.06742): ``L = iters`` alternations of rows then columns,

        X <- G;  repeat L times:  X <- sqrt(n) Q(X)^{-1} X;   X <- sqrt(m) X R(X)^{-1}

    so columns end with norm sqrt(m) exactly, rows near sqrt(n), and ``||X||_F = sqrt(mn)``.

    ``method="fast"`` (default) uses the Sinkhorn identity: every iterate is
    ``Diag(sqrt u) G Diag(sqrt v)`` where (u, v) is the Sinkhorn-Knopp scaling of ``A = G * G`` with row
    targets n and column targets m,

        v0 = 1;  repeat L times:  u = n / (A v);   v = m / (A^T u);     X = sqrt(u)[:, None] * G * sqrt(v)[None, :]

    so only two vectors are iterated and the output is written once. Passes over m x n data: one read of G
    (its largest entry, for an exact power-of-four prescale that keeps the squares in range), one writing
    ``A = (qG)^2`` and one squaring it in place, 2L mat-vecs reading A (the first is its row sums), one
    writing ``r G c``; ``(4 + 2L) mn`` flops, one m x n fp32 buffer plus m + n floats, no host
    synchronisation. Norms are clamped at ``eps`` exactly as in the literal form, whose output it matches
    to float rounding. ``method="alternating"`` is the literal form (``sr_sinkhorn_naive``):
    ~6L mn flops and 2L full-size temporaries.

    Signs are preserved; at convergence the result is invariant to positive row/column rescaling of G.

    ``out`` (fast form only): a contiguous compute-dtype (float32/float64) tensor of G's shape used as the
    work buffer; the result is written there and ``out`` itself is returned, in the compute dtype (no cast
    back to a low-precision G's dtype), so a caller looping over matrices can reuse one buffer and a bf16
    gradient costs one fp32 m x n buffer in all.
    """
    _check(G, "sr_sinkhorn")
    _check_iters(iters, "sr_sinkhorn")
    if method == "alternating":
        if out is not None:
            raise ValueError("sr_sinkhorn: out is only supported by method='fast'")
        return sr_sinkhorn_naive(G, iters, eps)
    if method != "fast":
        raise ValueError(f"sr_sinkhorn: method must be 'fast' or 'alternating', got {method!r}")
    r, c, buf = _sinkhorn_factors(G, iters, eps, out)
    X = torch.mul(G, r.unsqueeze(-1), out=buf).mul_(c.unsqueeze(-2))
    return X if out is not None else X.to(G.dtype)


def sr_sinkhorn_naive(G: Tensor, iters: int = 5, eps: float = DEFAULT_EPS) -> Tensor:
    r"""The literal alternating SR-Sinkhorn (reference and benchmark baseline for ``sr_sinkhorn``):
    ``iters`` times row_normalize then col_normalize, on G at unit entry RMS. Cost ~6L mn flops, 2L temporaries."""
    _check(G, "sr_sinkhorn_naive")
    _check_iters(iters, "sr_sinkhorn_naive")
    m, n = G.shape[-2:]
    X = _unit_rms(G)
    for _ in range(iters):
        X = X * (math.sqrt(n) / torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(eps))
        X = X * (math.sqrt(m) / torch.linalg.vector_norm(X, dim=-2, keepdim=True).clamp_min(eps))
    return X.to(G.dtype)


# ----------------------------------------------------------------------------------------------------------
# MultiNorm


NORMALIZERS: dict[str, Normalizer] = {
    "row": row_normalize,
    "col": col_normalize,
    "spectral": spectral_normalize,
    "frobenius": frobenius_normalize,
    "sign": sign_normalize,
    "gradnorm": gradnorm,
}


def _resolve(op: str | Normalizer) -> Normalizer:
    if callable(op):
        return op
    if isinstance(op, str) and op in NORMALIZERS:
        return NORMALIZERS[op]
    raise ValueError(f"unknown normalization {op!r}; valid names: {', '.join(NORMALIZERS)} (or a callable)")


def multi_normalize(G: Tensor, ops: Sequence[str | Normalizer], iters: int = 1) -> Tensor:
    r"""MultiNorm (Algorithm 1 of arXiv 2502.06742): ``x <- G; repeat iters times: for P in ops: x <- P(x)``.

    ``ops`` are names from ``NORMALIZERS`` ("row", "col", "spectral", "frobenius", "sign", "gradnorm") or
    callables on (..., m, n) tensors. Intermediates stay in the compute dtype; the result is cast back once.
    Cost: ``iters * sum(cost(P))``. SWAN is ``(gradnorm, spectral)`` with iters=1, SinkGD ``(row, col)``
    with iters=5 (``sr_sinkhorn`` computes the latter faster).
    """
    _check(G, "multi_normalize")
    _check_iters(iters, "multi_normalize")
    if isinstance(ops, str):
        ops = (ops,)
    fns = [_resolve(op) for op in ops]
    if not fns:
        raise ValueError("multi_normalize: ops is empty")
    X = G.to(_compute_dtype(G.dtype))
    for _ in range(iters):
        for fn in fns:
            X = fn(X)
    return X.to(G.dtype)
