"""The stateless optimizers SinkGD, SWAN and MNGD: exact steps and torch.optim conventions."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from multinorm import normalize as N
from multinorm.bench.measure import HostSyncCounter
from multinorm.optim import MNGD, SWAN, SinkGD, swan_direction
from multinorm.optim import base
from multinorm.optim import sinkgd as sinkgd_module
from multinorm.optim.reference import (SinkGDReference, SWANReference, gradnorm_reference,
                                      newton_schulz_whiten_reference, nsds_whiten_reference, sr_sinkhorn_reference,
                                      whiten_reference)


pytestmark = pytest.mark.usefixtures("one_thread")


def matrix_with_grad(shape=(48, 80), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
    rows = torch.exp(torch.randn(shape[0], 1, generator=g))
    W.grad = (torch.randn(shape, generator=g) * rows).to(dtype)
    return W


# ------------------------------------------------------------------------------------------------------------
# float64 references, written from the formulas in the optimizers' docstrings (no code shared with them)


def ref_row(X):
    return math.sqrt(X.shape[1]) * X / X.norm(dim=1, keepdim=True)


def ref_col(X):
    return math.sqrt(X.shape[0]) * X / X.norm(dim=0, keepdim=True)


# SinkGD's and SWAN's pieces come from the paper-literal module (multinorm.optim.reference), which shares no code
# with the fast optimizers
ref_sinkgd = sr_sinkhorn_reference
ref_gradnorm = gradnorm_reference
ref_inverse_sqrt_whiten = whiten_reference
ref_coupled_newton_schulz = newton_schulz_whiten_reference


ref_nsds = nsds_whiten_reference


def ref_frobenius(X):
    return math.sqrt(X.numel()) * X / X.norm()


def ref_spectral(X):
    return math.sqrt(max(X.shape)) * ref_inverse_sqrt_whiten(X)


def ref_mngd(G, norms, L):
    X = G.double()
    for _ in range(L):
        for norm in norms:
            X = norm(X)
    return X


CASES = {
    "sinkgd": (lambda p, **kw: SinkGD(p, **kw), lambda G: ref_sinkgd(G, 5)),
    "sinkgd-L2": (lambda p, **kw: SinkGD(p, iters=2, **kw), lambda G: ref_sinkgd(G, 2)),
    "sinkgd-unfused": (lambda p, **kw: SinkGD(p, fused=False, **kw), lambda G: ref_sinkgd(G, 5)),
    "swan": (lambda p, **kw: SWAN(p, **kw),
             lambda G: ref_frobenius(ref_coupled_newton_schulz(ref_gradnorm(G), 10, 0.8))),
    "swan-nsds": (lambda p, **kw: SWAN(p, variant="nsds", **kw),
                  lambda G: ref_frobenius(ref_nsds(ref_gradnorm(G), 2, 0.4))),
    "swan-exact": (lambda p, **kw: SWAN(p, whitening="exact", **kw),
                   lambda G: ref_frobenius(ref_inverse_sqrt_whiten(ref_gradnorm(G)))),
    "mngd": (lambda p, **kw: MNGD(p, norms=("row", "col", "spectral"), iters=2, **kw),
             lambda G: ref_mngd(G, (ref_row, ref_col, ref_spectral), 2)),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_step_matches_float64_reference(name, shape, dtype, weight_decay):
    make, reference = CASES[name]
    W = matrix_with_grad(shape, dtype=dtype)
    W0, G = W.detach().clone(), W.grad.clone()
    lr = 0.01
    opt = make([W], lr=lr, weight_decay=weight_decay)
    opt.step()
    expected = W0.double() * (1 - lr * weight_decay) - lr * reference(G)
    # float64: agreement to round-off. float32: W (entries ~1) carries ~1e-7 rounding plus lr = 0.01 times
    # the fp32 direction's error, ~1e-5 -- except for Newton-Schulz on a tall gradient: centring rows of
    # 48 entries leaves the 48 x 48 Gram matrix singular, and beta = 0.8 multiplies the round-off in that
    # null direction by up to 2.4 per step (2.4^10 ~ 6e3): up to ~5e-3 of the direction, i.e. 5e-5 here.
    atol = 1e-10 if dtype == torch.float64 else 5e-5 if (name == "swan" and shape[0] > shape[1]) else 1e-6
    torch.testing.assert_close(W.detach().double(), expected, rtol=0, atol=atol)
    assert torch.equal(W.grad, G)  # the gradient is not modified
    assert opt.state_dict()["state"] == {} and len(opt.state) == 0


@pytest.mark.parametrize("fused", [True, False])
def test_sinkgd_momentum_normalises_the_heavy_ball_buffer(fused):
    """m_1 = G_1, m_t = mu m_{t-1} + G_t, W <- W - lr SR-Sinkhorn(m_t): three steps against the float64 reference,
    and a copy restored from the state dict after step 2 takes the same step 3."""
    mu, lr = 0.9, 0.01
    W = matrix_with_grad((48, 80))
    grads = [matrix_with_grad((48, 80), seed=s).grad for s in (1, 2, 3)]
    opt = SinkGD([W], lr=lr, momentum=mu, fused=fused)
    expected, m = W.detach().double().clone(), None
    for t, G in enumerate(grads):
        W.grad = G.clone()
        m = G.double() if m is None else mu * m + G.double()
        expected -= lr * ref_sinkgd(m, 5)
        if t == 2:
            twin = torch.nn.Parameter(W.detach().clone())
            twin.grad = G.clone()
            restored = SinkGD([twin], lr=lr, momentum=mu, fused=fused)
            restored.load_state_dict(copy.deepcopy(opt.state_dict()))
            restored.step()
        opt.step()
        assert torch.equal(W.grad, G)  # the gradient is not modified
    torch.testing.assert_close(W.detach().double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(opt.state[W]["momentum_buffer"].double(), m, rtol=1e-6, atol=1e-6)
    assert torch.equal(twin.detach(), W.detach())


def test_swan_newton_schulz_is_close_to_exact_whitening():
    # SWAN's (10, 0.8) Newton-Schulz lands singular values in a band around 1, not at 1
    G = matrix_with_grad((64, 96), seed=3).grad
    exact = ref_frobenius(ref_inverse_sqrt_whiten(ref_gradnorm(G)))
    direction = swan_direction(G)
    cos = torch.nn.functional.cosine_similarity(direction.double().flatten(), exact.flatten(), dim=0)
    assert cos > 0.9
    assert direction.norm().item() == pytest.approx(math.sqrt(G.numel()), rel=1e-5)


def test_mngd_row_col_equals_sinkgd():
    A, B = matrix_with_grad(seed=5), matrix_with_grad(seed=5)
    SinkGD([A], lr=0.1, iters=5).step()
    MNGD([B], lr=0.1, norms=("row", "col"), iters=5).step()
    torch.testing.assert_close(A, B, rtol=0, atol=1e-6)


def test_swan_stages_can_be_switched_off():
    G = matrix_with_grad((40, 64), seed=2).grad
    torch.testing.assert_close(swan_direction(G, whiten=False), N.gradnorm(G), rtol=1e-6, atol=1e-6)
    # two float32 SVDs of differently prescaled copies of G: each is ~1e-6 from the float64 polar factor
    torch.testing.assert_close(swan_direction(G, gradnorm=False, whitening="exact", rescale=False),
                               N.whiten(G, method="exact"), rtol=0, atol=3e-6)
    plain = swan_direction(G, gradnorm=False, whiten=False)
    torch.testing.assert_close(plain, N.frobenius_normalize(G))
    uncentred = swan_direction(G, center=False, whitening="exact")
    assert not torch.allclose(uncentred, swan_direction(G, whitening="exact"), atol=1e-3)


def test_swan_gradnorm_axis_longer_transposes_tall_gradients():
    G = matrix_with_grad((96, 40), seed=4).grad  # tall: out > in
    longer = swan_direction(G, gradnorm_axis="longer", whitening="exact")
    torch.testing.assert_close(longer, swan_direction(G.T.contiguous(), whitening="exact").T, rtol=0, atol=1e-4)
    assert not torch.allclose(longer, swan_direction(G, whitening="exact"), atol=1e-3)
    # along the longer dim SWAN is a one-pass fixed point: its columns are already standardised
    torch.testing.assert_close(longer.mean(dim=0), torch.zeros(40), atol=1e-5, rtol=0)
    wide = matrix_with_grad((40, 96), seed=4).grad  # wide: both settings agree
    torch.testing.assert_close(swan_direction(wide, gradnorm_axis="longer"), swan_direction(wide))


def test_swan_validates_options():
    W = [matrix_with_grad()]
    with pytest.raises(ValueError, match="variant"):
        SWAN(W, variant="half")
    with pytest.raises(ValueError, match="gradnorm_axis"):
        SWAN(W, gradnorm_axis="output")
    with pytest.raises(ValueError, match="whitening"):
        SWAN(W, whitening="svd")
    with pytest.raises(ValueError, match="variant='full'"):
        SWAN(W, variant="nsds", whitening="exact")
    with pytest.raises(ValueError, match="beta"):
        SWAN(W, beta=0.2)
    assert SWAN(W, variant="nsds").defaults["ns_steps"] == 2
    assert SWAN(W, variant="nsds").defaults["beta"] == 0.4
    assert SWAN(W).defaults["ns_steps"] == 10 and SWAN(W).defaults["beta"] == 0.8


@pytest.mark.parametrize("cls", [SinkGD, SWAN, MNGD])
def test_vectors_are_rejected_and_sparse_gradients_raise(cls):
    with pytest.raises(ValueError, match="matrices only"):
        cls([torch.nn.Parameter(torch.ones(5))])
    with pytest.raises(ValueError, match="matrices only"):
        cls([{"params": [matrix_with_grad()]}, {"params": [torch.nn.Parameter(torch.ones(5))]}])
    W = torch.nn.Parameter(torch.randn(6, 4))
    W.grad = torch.randn(6, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        cls([W]).step()
    with pytest.raises(ValueError, match="lr"):
        cls([matrix_with_grad()], lr=-1.0)


@pytest.mark.parametrize("cls", [SinkGD, SWAN, MNGD])
def test_torch_conventions(cls):
    A, B, C = matrix_with_grad(seed=1), matrix_with_grad((30, 20), seed=2), torch.nn.Parameter(torch.randn(8, 8))
    opt = cls([{"params": [A, C], "lr": 0.1}, {"params": [B], "lr": 0.01}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    A0, B0, C0 = A.detach().clone(), B.detach().clone(), C.detach().clone()
    opt.step()
    assert torch.equal(C, C0)  # no gradient: skipped
    dA, dB = (A - A0).norm().item(), (B - B0).norm().item()
    # both updates have entry RMS 1, so the step norms are lr * sqrt(mn)
    assert dA == pytest.approx(0.1 * math.sqrt(A.numel()), rel=1e-3)
    assert dB == pytest.approx(0.01 * math.sqrt(B.numel()), rel=1e-3)

    # LR scheduler: halves every group's lr, and the step follows
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.005]
    A1 = A.detach().clone()
    opt.step()
    assert (A - A1).norm().item() == pytest.approx(0.05 * math.sqrt(A.numel()), rel=1e-3)

    # zero_grad
    opt.zero_grad()
    assert A.grad is None and B.grad is None

    # closure: evaluated with grad enabled, its loss returned
    target = torch.randn(48, 80)

    def closure():
        opt.zero_grad()
        loss = ((A - target) ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and A.grad is not None

    # state_dict round trip: hyperparameters (and the lr the scheduler set) survive
    state = copy.deepcopy(opt.state_dict())
    assert state["state"] == {}
    other = cls([{"params": [A, C], "lr": 1.0}, {"params": [B], "lr": 1.0}])
    other.load_state_dict(state)
    assert [g["lr"] for g in other.param_groups] == [0.05, 0.005]
    assert {k: v for k, v in other.param_groups[0].items() if k != "params"} == \
           {k: v for k, v in opt.param_groups[0].items() if k != "params"}


def test_float64_parameters_stay_float64():
    for cls in (SinkGD, SWAN, MNGD):
        W = matrix_with_grad(dtype=torch.float64)
        cls([W], lr=0.01).step()
        assert W.dtype == torch.float64


def ulp(x):
    """Spacing of x's dtype at |x| (the gap to the next representable number away from zero)."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)).float() - a.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [SinkGD, SWAN, MNGD])
def test_low_precision_step_is_the_fp32_step_rounded(cls, dtype):
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter((0.02 * torch.randn(48, 80, generator=g)).to(dtype))
    W.grad = (torch.randn(48, 80, generator=g) * torch.exp(torch.randn(48, 1, generator=g))).to(dtype)
    W32 = torch.nn.Parameter(W.detach().float())
    W32.grad = W.grad.float()  # the same (exactly representable) gradient values
    # weight decay lr * wd = 1e-3 of each entry: a quarter of a bf16 ulp, so decaying W in bf16 separately
    # from the update would round differently in many entries
    cls([W], lr=1e-3, weight_decay=1.0).step()
    cls([W32], lr=1e-3, weight_decay=1.0).step()
    assert W.dtype == dtype
    expected = W32.detach().to(dtype)
    # The low-precision step computes the same fp32 update from the same values and rounds W + update once.
    # The two fp32 results can differ by op-order rounding (~1e-7 relative), which moves a value across a
    # rounding boundary of the 8-bit (bf16) / 11-bit (fp16) mantissa only rarely: at most one ulp, in under
    # 1% of the entries.
    diff = (W.detach().float() - expected.float()).abs()
    assert (diff <= ulp(expected)).all()
    assert (diff > 0).float().mean().item() < 0.01


def test_higher_dim_weights_are_flattened_to_output_rows():
    K = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    K.grad = torch.randn(8, 3, 3, 3)
    K0, G = K.detach().clone(), K.grad.clone()
    SinkGD([K], lr=0.1).step()
    expected = K0 - 0.1 * N.sr_sinkhorn(G.reshape(8, 27)).reshape(8, 3, 3, 3)
    torch.testing.assert_close(K.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [SinkGD, SWAN, MNGD])
def test_zero_gradient_leaves_weights_unchanged(cls):
    W = torch.nn.Parameter(torch.randn(10, 12))
    W.grad = torch.zeros(10, 12)
    W0 = W.detach().clone()
    cls([W], lr=0.1).step()
    assert torch.equal(W, W0)


def test_stateless_optimizers_train_a_linear_regression():
    torch.manual_seed(0)
    X, W_true = torch.randn(256, 32), torch.randn(16, 32)
    Y = X @ W_true.T
    for opt_cls, lr in [(SinkGD, 0.02), (SWAN, 0.02), (MNGD, 0.02)]:
        W = torch.nn.Parameter(torch.zeros(16, 32))
        opt = opt_cls([W], lr=lr)
        first = None
        for _ in range(100):
            opt.zero_grad()
            loss = ((X @ W.T - Y) ** 2).mean()
            loss.backward()
            first = first if first is not None else loss.item()
            opt.step()
        assert loss.item() < 0.1 * first, opt_cls.__name__


# ------------------------------------------------------------------------------------------------------------
# maximize, option checks, transient memory


@pytest.mark.parametrize("cls", [SinkGD, SWAN, MNGD])
def test_maximize_ascends_as_descent_on_the_negated_gradient(cls):
    up, down = matrix_with_grad(seed=6), matrix_with_grad(seed=6)
    down.grad.neg_()
    W0 = up.detach().clone()
    cls([up], lr=0.01, weight_decay=0.1, maximize=True).step()
    cls([down], lr=0.01, weight_decay=0.1).step()
    torch.testing.assert_close(up, down, rtol=0, atol=1e-7)
    assert not torch.equal(up, W0)
    # first order: moving along +direction raises <G, W>
    assert (up.grad * (up.detach() - W0 * (1 - 0.01 * 0.1))).sum() > 0


def test_mngd_maximize_with_a_norm_that_is_not_odd():
    # a callable need not satisfy P(-G) = -P(G); maximize must then normalise -G, not flip P(G)
    shifted = lambda X: N.frobenius_normalize(X) + 1.0  # noqa: E731
    up, down = matrix_with_grad(seed=7), matrix_with_grad(seed=7)
    down.grad.neg_()
    MNGD([up], lr=0.01, norms=("row", shifted), iters=1, maximize=True).step()
    MNGD([down], lr=0.01, norms=("row", shifted), iters=1).step()
    torch.testing.assert_close(up, down, rtol=0, atol=1e-7)


BAD_OPTIONS = [
    (SinkGD, "lr", -1.0, "a float >= 0"),
    (SinkGD, "weight_decay", -0.1, "a float >= 0"),
    (SinkGD, "maximize", "yes", "a bool"),
    (SinkGD, "iters", 0, "an int >= 1"),
    (SinkGD, "eps", -1e-8, "a float >= 0"),
    (SWAN, "lr", float("nan"), "a float >= 0"),
    (SWAN, "variant", "bogus", "one of ['full', 'nsds']"),
    (SWAN, "gradnorm_axis", "output", "one of ['input', 'longer']"),
    (SWAN, "whitening", "svd", "one of ['newton-schulz', 'exact']"),
    (SWAN, "ns_steps", -1, "an int >= 0"),
    (SWAN, "beta", 0.2, "a float > 1/3"),
    (SWAN, "center", 1, "a bool"),
    (SinkGD, "momentum", 1.0, "a float in [0, 1)"),
    (SinkGD, "momentum", -0.1, "a float in [0, 1)"),
    (MNGD, "norms", ("row", "nuclear"), "a non-empty sequence of names from"),
    (MNGD, "norms", (), "a non-empty sequence of names from"),
    (MNGD, "iters", 2.0, "an int >= 1"),
    (MNGD, "maximize", None, "a bool"),
]


@pytest.mark.parametrize("cls,key,value,requirement", BAD_OPTIONS)
def test_bad_options_fail_when_the_group_is_added(cls, key, value, requirement):
    message = rf"^{cls.__name__}: {key} must be {re.escape(requirement)}.*, got {re.escape(repr(value))}$"
    with pytest.raises(ValueError, match=message):
        cls([matrix_with_grad()], **{key: value})  # constructor defaults go through add_param_group
    opt = cls([matrix_with_grad(seed=1)])
    extra = matrix_with_grad(seed=2)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [extra], key: value})
    assert len(opt.param_groups) == 1  # the rejected group was not kept
    opt.add_param_group({"params": [extra]})  # and its parameter can still be added


def test_swan_rejects_exact_whitening_with_nsds_in_any_group():
    with pytest.raises(ValueError, match=r"^SWAN: whitening must be 'newton-schulz' with variant='nsds'"):
        SWAN([matrix_with_grad()]).add_param_group({"params": [matrix_with_grad(seed=1)], "variant": "nsds",
                                                    "whitening": "exact"})


def test_swan_group_with_its_own_variant_takes_that_variants_defaults():
    opt = SWAN([matrix_with_grad()])
    opt.add_param_group({"params": [matrix_with_grad(seed=1)], "variant": "nsds"})
    opt.add_param_group({"params": [matrix_with_grad(seed=2)], "variant": "nsds", "ns_steps": 3})
    assert [(g["ns_steps"], g["beta"]) for g in opt.param_groups] == [(10, 0.8), (2, 0.4), (3, 0.4)]


class Float32Allocations(TorchDispatchMode):
    """Element counts of the float32 storages created by aten ops under this mode (each allocation once;
    a storage freed and allocated again counts again)."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live = {}
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for key, ref in list(self.live.items()):
            if ref.expired():
                del self.live[key]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.existing and key not in self.live:
                    self.live[key] = StorageWeakRef(storage)
                    self.sizes.append(storage.nbytes() // 4)
        return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cache_block", [None, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sinkgd_step_allocates_one_fp32_matrix_buffer(dtype, cache_block, fused, monkeypatch):
    """One m x n fp32 buffer with torch operations; none for a float32 matrix in the fused CPU loop."""
    if cache_block is not None:
        monkeypatch.setattr(sinkgd_module, "CACHE_BLOCK", cache_block)
    m, n = 48, 80
    W = matrix_with_grad((m, n), dtype=dtype)
    opt = SinkGD([W], lr=0.01, weight_decay=0.1, fused=fused)
    tracker = Float32Allocations([W, W.grad])
    with tracker:
        opt.step()
    big = [size for size in tracker.sizes if size >= m * n]
    assert big == ([] if fused and dtype == torch.float32 else [m * n]), tracker.sizes


# ------------------------------------------------------------------------------------------------------------
# batched steps, host synchronisation, compilation


def mixed_parameters(seed=0):
    """Six same-shape matrices (one batch), three of another shape, a bf16 one and a 4-D kernel."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 48)] * 6 + [(48, 32)] * 3 + [(32, 48), (8, 3, 3, 3)]
    params = []
    for i, shape in enumerate(shapes):
        dtype = torch.bfloat16 if i == 9 else torch.float32
        W = torch.nn.Parameter((0.02 * torch.randn(shape, generator=g)).to(dtype))
        rows = torch.exp(torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=g))
        W.grad = (torch.randn(shape, generator=g) * rows * 10.0 ** (i - 5)).to(dtype)  # scales 1e-5 .. 1e5
        params.append(W)
    return params


@pytest.mark.parametrize("batch_elements,cache_block,fused",
                         [(None, None, False), (2 * 32 * 48, None, False), (2 * 32 * 48, 256, False),
                          (None, None, True)],
                         ids=["one-batch-per-shape", "several-batches", "single-matrices-in-row-blocks", "fused-cpu"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_batched_sinkgd_step_equals_per_matrix_sr_sinkhorn(batch_elements, cache_block, fused, weight_decay,
                                                            monkeypatch):
    if batch_elements is not None:  # several batches per shape, some of a single matrix
        monkeypatch.setitem(base.BATCH_ELEMENTS, "cpu", batch_elements)
    if cache_block is not None:  # a single matrix counts as large: its step runs in blocks of rows
        monkeypatch.setattr(sinkgd_module, "CACHE_BLOCK", cache_block)
    params = mixed_parameters()
    before = [(W.detach().clone(), W.grad.clone()) for W in params]
    SinkGD(params, lr=0.01, weight_decay=weight_decay, fused=fused).step()
    for W, (W0, G) in zip(params, before):
        direction = N.sr_sinkhorn(G.float().reshape(G.shape[0], -1), 5).reshape(G.shape)
        expected = W0.float() * (1 - 0.01 * weight_decay) - 0.01 * direction
        if W.dtype == torch.bfloat16:  # the fp32 result rounded once: within one bf16 ulp
            assert ((W.detach().float() - expected).abs() <= ulp(expected.to(W.dtype))).all()
        else:
            torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-7)  # fp32 rounding of ~0.02 + 0.01 X


def _edge_gradients():
    g = torch.Generator().manual_seed(3)
    G = torch.randn(40, 56, generator=g)
    zero_row, zero_col, tiny_row = G.clone(), G.clone(), G.clone()
    zero_row[[0, 7]] = 0
    zero_col[:, 5] = 0
    tiny_row[2] *= 1e-10  # squares ~1e-20, summing below eps^2 at unit RMS: the floored row factor
    # rows whose raw squares underflow or overflow float32 (the compiled step sums them again, prescaled)
    subnormal_row, huge_row = G.clone(), G.clone()
    subnormal_row[4] *= 1e-25
    huge_row[9] *= 1e25
    # a zero row and a zero column at a tiny scale: their factors reach the floor (2^126) while the prescale
    # root is large, so a product of the two factors overflows; and a zero row of a 3-column matrix, whose
    # floor n / float32-max would be subnormal (its factor then overflowed)
    zero_cross = G * 1e-30
    zero_cross[0], zero_cross[:, 5] = 0, 0
    narrow = G[:, :3].clone()
    narrow[1] = 0
    return {"plain": G, "zero rows": zero_row, "zero column": zero_col, "tiny row": tiny_row,
            "zero row and column, scale 1e-30": zero_cross, "3 columns, a zero row": narrow,
            "subnormal row": subnormal_row, "huge row": huge_row, "scale 1e-20": G * 1e-20, "scale 1e18": G * 1e18,
            "all zero": torch.zeros(40, 56), "scale 1e-30": G * 1e-30, "scale 1e30": G * 1e30,
            "one row": G[:1].clone(), "one column": G[:, :1].clone()}


@pytest.mark.parametrize("case", list(_edge_gradients()))
@pytest.mark.parametrize("iters", [1, 5])
def test_fused_cpu_step_equals_the_torch_step(case, iters):
    """The compiled CPU loop and the torch operations agree to fp32 rounding on zero and floored rows, zero
    columns, extreme scales and vector-shaped matrices, with weight decay and maximize."""
    G = _edge_gradients()[case]
    results = []
    for fused in (True, False):
        W = torch.nn.Parameter(torch.linspace(-1, 1, G.numel()).reshape(G.shape))
        W.grad = G.clone()
        SinkGD([W], lr=0.01, iters=iters, weight_decay=0.1, maximize=case == "plain", fused=fused).step()
        assert torch.equal(W.grad, G)
        results.append(W.detach())
    assert torch.isfinite(results[0]).all() and torch.isfinite(results[1]).all()
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=2e-7)


def test_fused_cpu_step_of_a_batch_equals_its_matrices_stepped_alone():
    """The compiled loop shares its work vectors over a batch of same-shape matrices: stepping the edge cases
    together (a floored or re-summed matrix before a plain one) gives bit for bit what stepping each alone does."""
    grads = [G for G in _edge_gradients().values() if G.shape == (40, 56)][::-1]

    def parameters():
        params = [torch.nn.Parameter(torch.linspace(-1, 1, G.numel()).reshape(G.shape)) for G in grads]
        for W, G in zip(params, grads):
            W.grad = G.clone()
        return params

    together, alone = parameters(), parameters()
    SinkGD(together, lr=0.01, weight_decay=0.1).step()
    for W in alone:
        SinkGD([W], lr=0.01, weight_decay=0.1).step()
    assert len(grads) >= 10
    for a, b in zip(together, alone):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("threads", [2, 3, 16])
def test_fused_cpu_step_gives_the_same_bits_at_any_thread_count(threads):
    """A batch split over threads (each stepping whole matrices with its own work vectors) gives bit for bit
    what one thread gives, the edge cases included; more threads than matrices is fine."""
    from multinorm.optim import sinkgd_cpu

    grads = [G for G in _edge_gradients().values() if G.shape == (40, 56)]
    results = []
    for t in (1, threads):
        params = [torch.linspace(-1, 1, G.numel()).reshape(G.shape) for G in grads]
        sinkgd_cpu.sinkgd_matrix_step(params, [G.clone() for G in grads], 5, 1e-8, 0.01, 0.1, False, threads=t,
                                      min_share_entries=1)
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], torch.linspace(-1, 1, 40 * 56).reshape(40, 56))  # it stepped


def test_row_blocks_cover_the_rows_in_multiples_of_four():
    from multinorm.optim.sinkgd_cpu import BLOCK_ENTRIES, row_blocks

    assert row_blocks(256, 683, BLOCK_ENTRIES) == [(0, 256)]  # every matrix of the small models is one block
    assert len(row_blocks(2048, 5461, BLOCK_ENTRIES)) == 11
    for m, n, entries in [(40, 56, 500), (41, 56, 500), (5, 10**6, 10), (3, 7, 1), (2048, 2048, BLOCK_ENTRIES)]:
        blocks = row_blocks(m, n, entries)
        assert blocks[0][0] == 0 and blocks[-1][1] == m
        assert all(b == a2 for (_, b), (a2, _) in zip(blocks, blocks[1:]))
        assert all((b - a) % 4 == 0 for a, b in blocks[:-1]) and all(b > a for a, b in blocks)


@pytest.mark.parametrize("count", [1, 3])
def test_fused_cpu_step_by_blocks_of_rows_gives_the_same_bits_at_any_thread_count(count):
    """A large matrix is stepped by blocks of rows (here forced small): one matrix on all threads, or a batch
    dealt out whole with the leftover on all threads, gives bit for bit what one thread gives, the edge cases
    included, and agrees with the torch step to fp32 rounding."""
    from multinorm.optim import sinkgd_cpu

    cases = [G for G in _edge_gradients().values() if G.shape == (40, 56)]
    batches = [cases[k:k + count] for k in range(0, len(cases) - count + 1, count)]
    for grads in batches:
        results = []
        for t in (1, 2, 3, 16):
            params = [torch.linspace(-1, 1, G.numel()).reshape(G.shape) for G in grads]
            sinkgd_cpu.sinkgd_matrix_step(params, [G.clone() for G in grads], 5, 1e-8, 0.01, 0.1, False, threads=t,
                                          block_entries=500, min_share_entries=1)
            results.append(params)
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)
        for W, G in zip(results[0], grads):
            ref = torch.nn.Parameter(torch.linspace(-1, 1, G.numel()).reshape(G.shape))
            ref.grad = G.clone()
            SinkGD([ref], lr=0.01, weight_decay=0.1, fused=False).step()
            assert torch.isfinite(W).all()
            torch.testing.assert_close(W, ref.detach(), rtol=0, atol=2e-7)


def test_fused_cpu_step_wakes_a_helper_thread_only_for_a_large_enough_batch(monkeypatch):
    """A batch is handed to helper threads only for every MIN_SHARE_ENTRIES entries it holds: a `nano` batch
    (16 matrices of 128 x 128, a quarter of a million entries) stays on the calling thread."""
    from multinorm.optim import sinkgd_cpu

    used = []
    real = sinkgd_cpu._pool
    monkeypatch.setattr(sinkgd_cpu, "_pool", lambda workers: used.append(workers) or real(workers))
    for count, side, expected in [(16, 128, []), (16, 256, [1]), (2, 64, [])]:
        used.clear()
        W, G = torch.zeros(count, side, side), torch.randn(count, side, side)
        sinkgd_cpu.sinkgd_matrix_step(list(W), list(G), 5, 1e-8, 0.01, 0.0, False, threads=2)
        assert used == expected, (count, side)
        assert not torch.equal(W, torch.zeros_like(W))  # it stepped


def test_fused_cpu_step_propagates_a_nan_gradient():
    W = torch.nn.Parameter(torch.ones(8, 12))
    W.grad = torch.randn(8, 12)
    W.grad[3, 4] = float("nan")
    SinkGD([W], lr=0.01).step()
    assert torch.isnan(W.detach()).any()


@pytest.mark.parametrize("cls,kwargs", [(SWAN, {}), (SWAN, {"variant": "nsds"}), (SWAN, {"gradnorm_axis": "longer"}),
                                        (MNGD, {"norms": ("row", "col", "spectral"), "iters": 2})])
def test_batched_step_equals_per_matrix_direction(cls, kwargs):
    params = mixed_parameters(seed=1)
    before = [(W.detach().clone(), W.grad.clone()) for W in params]
    cls(params, lr=0.01, weight_decay=0.1, **kwargs).step()
    for W, (W0, G) in zip(params, before):
        G2 = G.float().reshape(G.shape[0], -1)
        if cls is SWAN:
            direction = swan_direction(G2, **kwargs)
        else:
            direction = N.multi_normalize(G2, kwargs["norms"], kwargs["iters"])
        expected = W0.float() * 0.999 - 0.01 * direction.reshape(G.shape)
        if W.dtype == torch.bfloat16:  # the fp32 result rounded once: within one bf16 ulp
            assert ((W.detach().float() - expected).abs() <= ulp(expected.to(W.dtype))).all()
        else:
            torch.testing.assert_close(W.detach(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("cache_block", [None, 256])
@pytest.mark.parametrize("make", [
    lambda p: SinkGD(p, weight_decay=0.1),
    lambda p: SinkGD(p, maximize=True),
    lambda p: SWAN(p, weight_decay=0.1),
    lambda p: SWAN(p, variant="nsds", diagonal_z=True),
    lambda p: SWAN(p, whiten=False, rescale=False),
    lambda p: MNGD(p, norms=("row", "col", "gradnorm", "sign"), weight_decay=0.1),
], ids=["sinkgd", "sinkgd-max", "swan", "swan-nsds-diag", "swan-gradnorm-only", "mngd"])
def test_step_never_synchronises_with_the_host(make, cache_block, monkeypatch):
    if cache_block is not None:
        monkeypatch.setattr(sinkgd_module, "CACHE_BLOCK", cache_block)
    params = mixed_parameters(seed=2)
    params[0].grad.zero_()  # an all-zero gradient takes no other branch
    opt = make(params)
    counter = HostSyncCounter()
    with counter:
        opt.step()
    assert counter.count == 0
    with counter:  # the counter does see a synchronisation
        bool(params[1].grad.sum() > 0)
    assert counter.count == 1


@pytest.mark.parametrize("make", [
    lambda p: SWAN(p, whitening="exact", gradnorm_axis="longer"),
    lambda p: MNGD(p, norms=("row", "col", "spectral", "gradnorm", "sign"), weight_decay=0.1),
], ids=["swan-exact-longer", "mngd-spectral-exact"])
def test_exact_polar_factor_synchronises_only_in_the_svd_error_check(make):
    """An exact polar factor calls torch.linalg.svd, which reads its LAPACK/cuSOLVER status on the host."""
    params = mixed_parameters(seed=2)
    opt = make(params)
    counter = HostSyncCounter()
    with counter:
        opt.step()
    assert counter.count > 0 and set(counter.sources) == {"aten::_linalg_check_errors"}


def test_sinkgd_direction_compiles_to_one_graph():
    import shutil

    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        pytest.skip("torch.compile's inductor backend needs a C++ compiler on CPU; none found")
    torch._dynamo.reset()
    compiled = torch.compile(lambda G: N.sr_sinkhorn(G, 5), fullgraph=True)  # a graph break raises
    G = matrix_with_grad((24, 40), seed=8).grad
    torch.testing.assert_close(compiled(G), N.sr_sinkhorn(G, 5), rtol=1e-5, atol=1e-6)


def test_without_numba_the_fused_step_falls_back_to_the_torch_path(tmp_path):
    """`pip install multinorm` without the `fast` extra: SinkGD(fused=True) takes the torch path (the same step
    as fused=False, bit for bit) instead of failing on the missing compiler."""
    code = (
        "import sys\n"
        "sys.modules['numba'] = None  # as if numba were not installed\n"
        "import torch\n"
        "from multinorm.optim import SinkGD\n"
        "from multinorm.optim.sinkgd import compiled_step_available, step_path\n"
        "assert not compiled_step_available()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "W0, G = torch.randn(48, 80, generator=g), torch.randn(48, 80, generator=g)\n"
        "out = []\n"
        "for fused in (True, False):\n"
        "    W = torch.nn.Parameter(W0.clone()); W.grad = G.clone()\n"
        "    opt = SinkGD([W], lr=0.01, fused=fused)\n"
        "    out.append(step_path(opt.param_groups[0], [W], [W.grad]))\n"
        "    opt.step(); out.append(W.detach())\n"
        "assert out[0] == out[2] == 'batched', out[::2]\n"
        "assert torch.equal(out[1], out[3])\n"
        "assert 'numba' not in sys.modules or sys.modules['numba'] is None\n"
        "print('ok')\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_step_path_names_the_compiled_path_for_float32_cpu_matrices_with_numba():
    from multinorm.optim.sinkgd import compiled_step_available, step_path

    W = matrix_with_grad((48, 80))
    group = SinkGD([W]).param_groups[0]
    assert step_path(group, [W], [W.grad]) == ("compiled" if compiled_step_available() else "batched")
    assert step_path({**group, "fused": False}, [W], [W.grad]) == "batched"
    assert step_path({**group, "fused": False}, [W], [W.grad], cache_block=100) == "blocked"
    W64 = matrix_with_grad((48, 80), dtype=torch.float64)
    assert step_path(group, [W64], [W64.grad]) == "batched"


@pytest.mark.parametrize("fast,reference", [
    (lambda p: SinkGD(p, lr=0.01), lambda p: SinkGDReference(p, lr=0.01)),
    (lambda p: SinkGD(p, lr=0.01, fused=False), lambda p: SinkGDReference(p, lr=0.01)),
    (lambda p: SWAN(p, lr=0.01), lambda p: SWANReference(p, lr=0.01)),
])
def test_training_with_the_fast_optimizer_follows_the_paper_literal_one(fast, reference):
    """Three steps of a linear regression: the fast optimizer's weights stay within 1e-4 of the paper-literal
    float64 optimizer's (multinorm.optim.reference) at every step, a hundredth of what one step moves them (lr =
    0.01 on updates of entry RMS 1), so a missing or different part of the method would show. (Later, with the
    loss near its floor, unit-size steps make both trajectories oscillate and their round-off grows: SWAN's whitened
    fourth step is 1e-4 apart on some CPUs, 6e-6 after the third, as float32 matmuls round differently by CPU.)"""
    torch.manual_seed(0)
    x, y = torch.randn(256, 24), torch.randn(256, 16)
    # one wide weight (16 x 24) with full-rank gradients: whitening a rank-deficient gradient (a tall one after
    # centring, or a chain of linear maps) scales float32 round-off in its null directions up to unit size
    nets = [torch.nn.Sequential(torch.nn.Linear(24, 16, bias=False)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    nets[1].double()
    opts = [fast(nets[0].parameters()), reference(nets[1].parameters())]
    for _ in range(3):
        for net, opt, dtype in zip(nets, opts, (torch.float32, torch.float64)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x.to(dtype)), y.to(dtype)).backward()
            opt.step()
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-4)


def test_fused_cpu_step_in_a_forked_child_starts_its_own_threads():
    """The helper threads of a parent do not exist in a forked child: its threaded step must not wait on them."""
    import multiprocessing

    from multinorm.optim import sinkgd_cpu

    def step(threads):
        W, G = torch.zeros(4, 8, 8), torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
        sinkgd_cpu.sinkgd_matrix_step(list(W), list(G), 5, 1e-8, 0.01, 0.0, False, threads=threads,
                                      min_share_entries=1)
        return W

    parent = step(2)  # the parent's pool now exists
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply_async(_threaded_step_in_child).get(timeout=60)
    assert torch.equal(torch.from_numpy(child), parent)


def _threaded_step_in_child():
    from multinorm.optim import sinkgd_cpu

    W, G = torch.zeros(4, 8, 8), torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    sinkgd_cpu.sinkgd_matrix_step(list(W), list(G), 5, 1e-8, 0.01, 0.0, False, threads=2, min_share_entries=1)
    return W.numpy()
