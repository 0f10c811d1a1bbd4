"""multinorm.normalize against float64 reference definitions written out here."""

from __future__ import annotations

import math

import pytest
import torch

from multinorm import normalize as N
from multinorm.studies.fixed_point import fixed_point_residual

SHAPES = [(512, 512), (1376, 512), (512, 1376)]  # 60m: q/k/v/o, gate/up, down


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def scaled(shape, seed=0, dtype=torch.float64):
    """Gaussian with rows and columns multiplied by log-normal factors (badly balanced gradient)."""
    g = torch.Generator().manual_seed(seed + 1000)
    m, n = shape
    rows = torch.exp(torch.randn(m, 1, generator=g, dtype=torch.float64))
    cols = torch.exp(torch.randn(1, n, generator=g, dtype=torch.float64))
    return (gaussian(shape, seed) * rows * cols).to(dtype)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# ------------------------------------------------------------------------------------------------------------
# float64 reference definitions (straight from the formulas, no shared code with the implementation)


def ref_row(G):
    return math.sqrt(G.shape[1]) * G / G.norm(dim=1, keepdim=True)


def ref_col(G):
    return math.sqrt(G.shape[0]) * G / G.norm(dim=0, keepdim=True)


def ref_gradnorm(G):
    centred = G - G.mean(dim=1, keepdim=True)
    return centred / centred.std(dim=1, correction=0, keepdim=True)


def ref_polar(G):
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ Vh


def ref_sinkhorn(G, L):
    X = G.clone()
    for _ in range(L):
        X = ref_row(X)
        X = ref_col(X)
    return X


def ref_coupled_ns(X, steps, beta):
    """Coupled Newton-Schulz exactly as written in docs/algorithms.md#coupled-newton-schulz-iteration (m <= n), scaled to its fixed point."""
    A = X @ X.T
    a = A.norm()
    Y, Z = A / a, torch.eye(A.shape[0], dtype=X.dtype)
    for _ in range(steps):
        T = 3 * torch.eye(A.shape[0], dtype=X.dtype) - Z @ Y
        Y, Z = beta * Y @ T, beta * T @ Z
    return Z @ X / math.sqrt((3 - 1 / beta) * a)


def ref_nsds(X, steps, beta, diagonal_z):
    """NSDS as written in docs/algorithms.md#nsds with explicit Diag matrices (m <= n)."""
    A = X @ X.T
    a = A.norm()
    eye = torch.eye(A.shape[0], dtype=X.dtype)
    Y, Z = A / a, eye.clone()
    for _ in range(steps):
        Dz = torch.diag(torch.diag(Z))
        Y_new = beta * Y @ torch.diag(3 - torch.diag(Z) * torch.diag(Y))
        Z = beta * (3 * eye - Dz @ Y) @ Dz
        if diagonal_z:
            Z = torch.diag(torch.diag(Z))
        Y = Y_new
    return Z @ X / math.sqrt((3 - 1 / beta) * a)


# ------------------------------------------------------------------------------------------------------------
# single operators


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", [gaussian, scaled])
def test_row_col_gradnorm_match_reference(shape, make):
    G = make(shape)
    exact_gradnorm = lambda X: N.gradnorm(X, eps=0.0)  # noqa: E731  (eps = 1e-8 shifts it by 1e-8)
    for fn, ref in [(N.row_normalize, ref_row), (N.col_normalize, ref_col), (exact_gradnorm, ref_gradnorm)]:
        assert rel(fn(G), ref(G)) < 1e-12
        assert rel(fn(G.float()), ref(G)) < 1e-5
    m, n = shape
    X = N.row_normalize(G)
    torch.testing.assert_close(X.norm(dim=1), torch.full((m,), math.sqrt(n), dtype=G.dtype))
    X = N.col_normalize(G)
    torch.testing.assert_close(X.norm(dim=0), torch.full((n,), math.sqrt(m), dtype=G.dtype))
    X = exact_gradnorm(G)
    torch.testing.assert_close(X.mean(dim=1), torch.zeros(m, dtype=G.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(X.std(dim=1, correction=0), torch.ones(m, dtype=G.dtype))
    assert X.norm().item() == pytest.approx(math.sqrt(m * n), rel=1e-12)
    assert rel(N.gradnorm(G), X) < 1e-5  # the default eps = 1e-8 (relative to unit RMS) barely moves it


def test_gradnorm_without_centring_is_row_normalize():
    G = scaled((300, 200)) + 3.0  # non-zero row means, so centring matters
    assert rel(N.gradnorm(G, center=False), N.row_normalize(G)) < 1e-7  # they differ only in where eps enters
    assert rel(N.gradnorm(G, center=True), N.row_normalize(G)) > 1e-2


def test_frobenius_and_sign():
    G = scaled((300, 200))
    X = N.frobenius_normalize(G)
    assert X.norm().item() == pytest.approx(math.sqrt(300 * 200), rel=1e-12)
    assert rel(X, G) > 0 and cosine(X, G) == pytest.approx(1.0, abs=1e-12)
    G[0, :5] = 0
    S = N.sign_normalize(G)
    assert torch.equal(S, torch.sign(G))


@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_and_exact_whitening_match_svd(shape):
    G = scaled(shape)
    assert rel(N.whiten(G, method="exact"), ref_polar(G)) < 1e-10
    assert rel(N.spectral_normalize(G), math.sqrt(max(shape)) * ref_polar(G)) < 1e-10
    assert N.spectral_normalize(G).norm().item() == pytest.approx(math.sqrt(shape[0] * shape[1]), rel=1e-10)


# ------------------------------------------------------------------------------------------------------------
# Newton-Schulz whitening


def ill_conditioned(m=256, n=768, seed=0):
    """A GradNorm-ed gradient with singular values spread over three decades (docs/algorithms.md#choosing-steps-and-beta)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -3, m, dtype=torch.float64)
    return ref_gradnorm(U @ torch.diag(s) @ V.T)


def test_newton_schulz_swan_setting_whitens_ill_conditioned_input():
    X = ill_conditioned()
    exact = ref_polar(X)
    assert cosine(X, exact) < 0.6  # GradNorm alone is far from whitened
    W = N.whiten(X.float(), steps=10, beta=0.8)
    assert W.dtype == torch.float32
    assert cosine(W, exact) > 0.95


def test_newton_schulz_classical_converges_to_polar_factor():
    X = ill_conditioned(128, 384)
    W = N.whiten(X, steps=30, beta=0.5)
    assert rel(W, ref_polar(X)) < 1e-3
    assert rel(N.whiten(X.float(), steps=30, beta=0.5), ref_polar(X)) < 1e-2  # fp32, condition 1e3
    # few classical steps under-whiten (the reason SWAN uses beta = 0.8)
    assert cosine(N.whiten(X, steps=5, beta=0.5), ref_polar(X)) < 0.95


@pytest.mark.parametrize("steps,beta", [(10, 0.8), (6, 0.5), (3, 0.4)])
def test_newton_schulz_matches_literal_iteration(steps, beta):
    X = ill_conditioned(96, 200, seed=3)
    assert rel(N.whiten(X, steps=steps, beta=beta), ref_coupled_ns(X, steps, beta)) < 1e-9
    # tall input: computed on the smaller side, X (X^T X)^{-1/2} = (X^T (X X^T)^{-1/2})^T
    assert rel(N.whiten(X.T, steps=steps, beta=beta), ref_coupled_ns(X, steps, beta).T) < 1e-9


def test_newton_schulz_is_normalised_internally():
    # GradNorm output has ||X||_F = sqrt(mn), far outside the convergence region of the raw iteration
    X = N.gradnorm(gaussian((512, 1376)).float())
    W = N.whiten(X, steps=10, beta=0.8)
    assert torch.isfinite(W).all()
    assert cosine(W, ref_polar(X.double())) > 0.95


@pytest.mark.parametrize("diagonal_z", [False, True])
def test_nsds_matches_literal_formula(diagonal_z):
    X = ill_conditioned(64, 160, seed=5)
    out = N.whiten_nsds(X, steps=2, beta=0.4, diagonal_z=diagonal_z)
    assert rel(out, ref_nsds(X, 2, 0.4, diagonal_z)) < 1e-10
    # docs/algorithms.md#nsds: after GradNorm, NSDS stays very close to GradNorm itself
    assert cosine(out, X) > 0.99
    assert rel(N.whiten_nsds(X.T, diagonal_z=diagonal_z), ref_nsds(X, 2, 0.4, diagonal_z).T) < 1e-10


def test_whiten_rejects_bad_arguments():
    G = gaussian((4, 6))
    with pytest.raises(ValueError, match="beta"):
        N.whiten(G, beta=0.3)
    with pytest.raises(ValueError, match="method"):
        N.whiten(G, method="svd")


# ------------------------------------------------------------------------------------------------------------
# SR-Sinkhorn


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", [gaussian, scaled])
def test_fast_sinkhorn_equals_literal_form(shape, make):
    G = make(shape, dtype=torch.float32)
    for L in range(1, 21):
        fast, literal = N.sr_sinkhorn(G, L), N.sr_sinkhorn_naive(G, L)
        assert fast.dtype == torch.float32
        assert rel(fast, literal) <= 1e-5, L
    assert torch.equal(N.sr_sinkhorn(G, 3, method="alternating"), N.sr_sinkhorn_naive(G, 3))


@pytest.mark.parametrize("shape", SHAPES)
def test_sinkhorn_matches_float64_reference(shape):
    G = scaled(shape)
    m, n = shape
    for L in (1, 2, 5):
        X = N.sr_sinkhorn(G, L)
        assert rel(X, ref_sinkhorn(G, L)) < 1e-12
        assert rel(N.sr_sinkhorn(G.float(), L), ref_sinkhorn(G, L)) < 1e-5
    X = N.sr_sinkhorn(G, 5)
    torch.testing.assert_close(X.norm(dim=0), torch.full((n,), math.sqrt(m), dtype=G.dtype), rtol=1e-12, atol=0)
    assert X.norm().item() == pytest.approx(math.sqrt(m * n), rel=1e-12)
    X = N.sr_sinkhorn(gaussian(shape), 5)
    assert (X.norm(dim=1) / math.sqrt(n) - 1).abs().max().item() < 1e-6


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
@pytest.mark.parametrize("shape", [(40, 56), (7, 3), (3, 7)])
def test_sinkhorn_of_zero_rows_and_columns_matches_the_literal_form(shape, scale):
    """A zero row and a zero column stay zero and the rest matches the literal form in float64, at any scale
    and at widths where n / float32-max is subnormal: their floored factors stay finite (at 2^126), so no
    inf * 0 appears."""
    G = gaussian(shape, dtype=torch.float32) * scale
    G[1], G[:, 2] = 0, 0
    for L in (1, 5):
        X = N.sr_sinkhorn(G, L)
        assert torch.isfinite(X).all()
        assert (X[1] == 0).all() and (X[:, 2] == 0).all()
        literal = N.sr_sinkhorn_naive(G.double(), L)
        assert rel(X.double(), literal) < 1e-5, L


def test_sinkhorn_preserves_signs_and_is_invariant_to_diagonal_rescaling():
    G = gaussian((512, 1376), seed=7)
    g = torch.Generator().manual_seed(8)
    D1 = torch.exp(torch.randn(512, 1, generator=g, dtype=torch.float64))
    D2 = torch.exp(torch.randn(1, 1376, generator=g, dtype=torch.float64))
    X = N.sr_sinkhorn(G, 30)
    assert torch.equal(torch.sign(X), torch.sign(G))
    assert rel(N.sr_sinkhorn(D1 * G * D2, 30), X) < 1e-10
    # at a finite L the first row step already removes a row rescaling exactly
    assert rel(N.sr_sinkhorn(D1 * G, 1), N.sr_sinkhorn(G, 1)) < 1e-12


def test_sinkhorn_scalings_reproduce_output():
    G = scaled((200, 300), dtype=torch.float32)
    r, c = N.sr_sinkhorn_scalings(G, 4)
    assert (r > 0).all() and (c > 0).all()
    assert rel(r[:, None] * G * c[None, :], N.sr_sinkhorn(G, 4)) < 1e-6


def test_sinkhorn_out_buffer_is_used_and_returned():
    G = scaled((64, 96), dtype=torch.float32)
    buf = torch.empty(64, 96)
    out = N.sr_sinkhorn(G, 5, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out, N.sr_sinkhorn(G, 5))
    with pytest.raises(ValueError, match="out"):
        N.sr_sinkhorn(G, out=torch.empty(64, 96, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        N.sr_sinkhorn(G, out=torch.empty(96, 64).T)  # not contiguous


# ------------------------------------------------------------------------------------------------------------
# MultiNorm


def test_multinorm_row_col_is_sinkhorn():
    G = scaled((300, 500))
    assert rel(N.multi_normalize(G, ("row", "col"), iters=5), ref_sinkhorn(G, 5)) < 1e-12
    assert rel(N.multi_normalize(G, [N.row_normalize, "col"], iters=2), ref_sinkhorn(G, 2)) < 1e-12


def test_sinkgd_fixed_point_residual_decreases_with_L():
    G = scaled((512, 1376))
    residuals = [fixed_point_residual(N.multi_normalize(G, ("row", "col"), L), ("row", "col")) for L in (1, 2, 3, 5, 8)]
    assert all(b < a for a, b in zip(residuals, residuals[1:])), residuals
    assert residuals[-1] < 1e-8
    assert fixed_point_residual(G, ("row", "col")) > 0.5


def test_swan_pair_reaches_fixed_point_after_one_pass_on_wide_matrices():
    for shape in [(512, 1376), (64, 300)]:
        G = scaled(shape)
        X = N.multi_normalize(G, ("gradnorm", "spectral"), iters=1)
        assert fixed_point_residual(X, ("gradnorm", "spectral")) < 1e-7  # GradNorm's eps = 1e-8
        torch.testing.assert_close(X.norm(dim=1), torch.full((shape[0],), math.sqrt(shape[1]), dtype=X.dtype))
        assert fixed_point_residual(G, ("gradnorm", "spectral")) > 0.1
    # tall matrices with rows over the input dim are not a one-pass fixed point (docs/algorithms.md#when-one-pass-is-a-fixed-point)
    X = N.multi_normalize(scaled((1376, 512)), ("gradnorm", "spectral"))
    assert fixed_point_residual(X, ("gradnorm", "spectral")) > 1e-3


def test_multinorm_rejects_unknown_names():
    with pytest.raises(ValueError, match="valid names"):
        N.multi_normalize(gaussian((4, 4)), ("row", "nuclear"))
    with pytest.raises(ValueError, match="empty"):
        N.multi_normalize(gaussian((4, 4)), ())


# ------------------------------------------------------------------------------------------------------------
# batching, dtypes, edge cases

OPERATORS = {
    "row": N.row_normalize,
    "col": N.col_normalize,
    "gradnorm": N.gradnorm,
    "frobenius": N.frobenius_normalize,
    "sign": N.sign_normalize,
    "spectral": N.spectral_normalize,
    "whiten_ns": N.whiten,
    "whiten_exact": lambda G: N.whiten(G, method="exact"),
    "nsds": N.whiten_nsds,
    "nsds_diag": lambda G: N.whiten_nsds(G, diagonal_z=True),
    "sinkhorn": N.sr_sinkhorn,
    "sinkhorn_naive": N.sr_sinkhorn_naive,
    "multinorm": lambda G: N.multi_normalize(G, ("gradnorm", "spectral", "row"), iters=2),
}


@pytest.mark.parametrize("name", OPERATORS)
def test_batched_equals_per_slice(name):
    fn = OPERATORS[name]
    for shape in [(3, 40, 24), (2, 2, 24, 40)]:
        G = scaled((math.prod(shape[:-1]), shape[-1]), seed=11).float().reshape(shape)
        out = fn(G)
        flat, flat_in = out.reshape(-1, *shape[-2:]), G.reshape(-1, *shape[-2:])
        for i in range(flat.shape[0]):
            torch.testing.assert_close(flat[i], fn(flat_in[i]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", OPERATORS)
def test_degenerate_inputs_give_finite_output(name):
    fn = OPERATORS[name]
    G = gaussian((20, 30), seed=2).float()
    G[3] = 0
    G[:, 7] = 0
    for X in [G, torch.zeros(20, 30), gaussian((1, 30)).float(), gaussian((30, 1)).float(), gaussian((1, 1)).float()]:
        out = fn(X)
        assert out.shape == X.shape and out.dtype == X.dtype
        assert torch.isfinite(out).all(), X.shape
    assert torch.equal(fn(torch.zeros(20, 30)), torch.zeros(20, 30))
    out = fn(G)
    if name not in ("spectral", "whiten_ns", "whiten_exact", "nsds", "multinorm"):
        assert torch.equal(out[3], torch.zeros(30))  # row and column scalings keep zero rows zero


@pytest.mark.parametrize("name", OPERATORS)
def test_scale_invariance_over_sixty_decades(name):
    fn = OPERATORS[name]
    G = scaled((48, 80), seed=4).float()
    base = fn(G)
    for scale in (1e-30, 1e-20, 1e-10, 1e10, 1e20, 1e30):
        out = fn(G * scale)
        assert torch.isfinite(out).all(), scale
        assert rel(out, base) < 1e-5, scale


@pytest.mark.parametrize("name", OPERATORS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_in_low_precision_out(name, dtype):
    fn = OPERATORS[name]
    G = scaled((48, 80), seed=9).float()
    low = G.to(dtype)
    out = fn(low)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert cosine(out, fn(low.float())) > 0.999


@pytest.mark.parametrize("fn", [N.row_normalize, N.col_normalize, N.gradnorm, N.whiten, N.sr_sinkhorn,
                                N.spectral_normalize, N.sign_normalize, N.frobenius_normalize, N.whiten_nsds])
def test_invalid_inputs_raise_clear_errors(fn):
    with pytest.raises(ValueError, match="2-D|1-D|0-D|matrix"):
        fn(torch.randn(5))
    with pytest.raises(ValueError, match="0-D|matrix"):
        fn(torch.tensor(1.0))
    with pytest.raises(ValueError, match="floating"):
        fn(torch.ones(3, 4, dtype=torch.int64))
