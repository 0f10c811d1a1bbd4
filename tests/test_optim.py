"""The stateless optimizers SinkGD, SWAN and MNGD: exact steps and torch.optim conventions."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from multinorm import normalize as N
from multinorm.optim import MNGD, SWAN, SinkGD, swan_direction


pytestmark = pytest.mark.usefixtures("one_thread")


def matrix_with_grad(shape=(48, 80), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
    rows = torch.exp(torch.randn(shape[0], 1, generator=g))
    W.grad = (torch.randn(shape, generator=g) * rows).to(dtype)
    return W


def ref_sinkhorn64(G, L):
    X = G.double()
    m, n = X.shape
    for _ in range(L):
        X = math.sqrt(n) * X / X.norm(dim=1, keepdim=True)
        X = math.sqrt(m) * X / X.norm(dim=0, keepdim=True)
    return X


def ref_swan64(G):
    """GradNorm (centred, population std) -> exact polar factor -> Frobenius sqrt(mn)."""
    X = G.double()
    X = X - X.mean(dim=1, keepdim=True)
    X = X / X.std(dim=1, correction=0, keepdim=True)
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    P = U @ Vh
    return math.sqrt(X.numel()) * P / P.norm()


OPTIMIZERS = {
    "sinkgd": (lambda p, **kw: SinkGD(p, **kw), lambda G: N.sr_sinkhorn(G, 5)),
    "sinkgd-L2": (lambda p, **kw: SinkGD(p, iters=2, **kw), lambda G: N.sr_sinkhorn(G, 2)),
    "swan": (lambda p, **kw: SWAN(p, **kw), lambda G: swan_direction(G)),
    "swan-nsds": (lambda p, **kw: SWAN(p, variant="nsds", **kw), lambda G: swan_direction(G, variant="nsds")),
    "swan-exact": (lambda p, **kw: SWAN(p, whitening="exact", **kw), lambda G: swan_direction(G, whitening="exact")),
    "mngd": (lambda p, **kw: MNGD(p, norms=("row", "col", "spectral"), iters=2, **kw),
             lambda G: N.multi_normalize(G, ("row", "col", "spectral"), 2)),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_step_is_w_minus_lr_operator(name, weight_decay):
    make, operator = OPTIMIZERS[name]
    W = matrix_with_grad()
    W0, G = W.detach().clone(), W.grad.clone()
    opt = make([W], lr=0.01, weight_decay=weight_decay)
    opt.step()
    decayed = W0 * (1 - 0.01 * weight_decay) if weight_decay else W0
    assert torch.equal(W.detach(), decayed.add(operator(G), alpha=-0.01))  # bit for bit
    torch.testing.assert_close(W.detach(), W0 * (1 - 0.01 * weight_decay) - 0.01 * operator(G), rtol=0, atol=1e-6)
    assert torch.equal(W.grad, G)  # the gradient is not modified
    assert opt.state_dict()["state"] == {} and len(opt.state) == 0


def test_steps_match_float64_reference_definitions():
    W = matrix_with_grad((64, 96), seed=3)
    W0, G = W.detach().clone(), W.grad.clone()
    SinkGD([W], lr=1e-2).step()
    assert ((W.detach() - (W0 - 1e-2 * ref_sinkhorn64(G, 5)))).abs().max() < 1e-6
    W = matrix_with_grad((64, 96), seed=3)
    SWAN([W], lr=1e-2, whitening="exact").step()
    assert ((W.detach().double() - (W0.double() - 1e-2 * ref_swan64(G)))).abs().max() < 1e-6
    # SWAN's default Newton-Schulz (10, 0.8) is close to, not equal to, exact whitening
    direction = swan_direction(G)
    cos = torch.nn.functional.cosine_similarity(direction.double().flatten(), ref_swan64(G).flatten(), dim=0)
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
    torch.testing.assert_close(swan_direction(G, gradnorm=False, whitening="exact", rescale=False),
                               N.whiten(G, method="exact"), rtol=1e-5, atol=1e-6)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cls", [SinkGD, SWAN, MNGD])
def test_parameter_dtypes_are_kept(cls, dtype):
    W = matrix_with_grad(dtype=dtype)
    W0 = W.detach().clone()
    cls([W], lr=0.01).step()
    assert W.dtype == dtype and torch.isfinite(W).all() and not torch.equal(W, W0)


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
