r"""Paper-literal SinkGD and SWAN: the algorithms as the papers write them, one matrix at a time, in float64.

Slow on purpose and sharing no code with the fast optimizers (:mod:`multinorm.optim.sinkgd`,
:mod:`multinorm.optim.swan`, :mod:`multinorm.normalize`): each line below is a line of the math, so the tests
can hold the fast implementations against it (``tests/test_optim.py``). Use the fast ones to train.

SinkGD (arXiv 2502.06742, Algorithm 4), for a gradient :math:`G \in \mathbb{R}^{m \times n}`:

.. math::
    X \leftarrow G;\ \text{repeat } L \text{ times: } X \leftarrow \sqrt{n}\, Q(X)^{-1} X,\
    X \leftarrow \sqrt{m}\, X R(X)^{-1};\qquad W \leftarrow W - \gamma X

with :math:`Q, R` the diagonal matrices of row and column l2 norms.

SWAN (arXiv 2412.13148): GradNorm (rows centred over the input dimension and divided by their standard
deviation), then whitening :math:`(XX^\top)^{-1/2}X` by the coupled Newton-Schulz iteration on the smaller
side (:math:`Y_0 = A/\|A\|_F,\ Z_0 = I`; :math:`T = 3I - ZY,\ Y \leftarrow \beta YT,\ Z \leftarrow \beta TZ`;
output :math:`ZX/\sqrt{(3 - 1/\beta)\|A\|_F}`), scaled to entry RMS 1; :math:`W \leftarrow W - \gamma X`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["sr_sinkhorn_reference", "gradnorm_reference", "whiten_reference", "newton_schulz_whiten_reference",
           "nsds_whiten_reference",
           "swan_direction_reference", "SinkGDReference", "SWANReference"]


def _rows(X: Tensor) -> Tensor:
    return math.sqrt(X.shape[1]) * X / X.norm(dim=1, keepdim=True)


def _cols(X: Tensor) -> Tensor:
    return math.sqrt(X.shape[0]) * X / X.norm(dim=0, keepdim=True)


def sr_sinkhorn_reference(G: Tensor, iters: int = 5) -> Tensor:
    """L alternations of row then column normalisation, in float64."""
    X = G.double()
    for _ in range(iters):
        X = _cols(_rows(X))
    return X


def gradnorm_reference(G: Tensor, eps: float = 1e-8) -> Tensor:
    """Rows centred over the input dimension and divided by (population std + eps), the gradient first scaled to
    entry RMS 1 (so eps is relative), in float64."""
    X = G.double()
    X = X / X.square().mean().sqrt()
    X = X - X.mean(dim=1, keepdim=True)
    return X / (X.std(dim=1, correction=0, keepdim=True) + eps)


def whiten_reference(X: Tensor) -> Tensor:
    """(X X^T)^{-1/2} X on the smaller side from an eigendecomposition (a pseudo-inverse: null directions of
    the Gram matrix are dropped)."""
    X = X.double()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    lam, V = torch.linalg.eigh(X @ X.T)
    inv_sqrt = torch.where(lam > lam.max() * 1e-10, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    Q = (V * inv_sqrt) @ V.T @ X
    return Q.T if tall else Q


def newton_schulz_whiten_reference(X: Tensor, steps: int = 10, beta: float = 0.8, diagonal: bool = False) -> Tensor:
    """The coupled Newton-Schulz approximation of (X X^T)^{-1/2} X on the smaller side (module docstring). With
    ``diagonal`` (SWAN's NSDS), Z is replaced by Diag(diag(Z)) inside each step."""
    X = X.double()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    A = X @ X.T
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    Y, Z = A / A.norm(), eye
    for _ in range(steps):
        if diagonal:
            Dz = torch.diag(torch.diag(Z))
            Y, Z = beta * Y @ torch.diag(3 - torch.diag(Z) * torch.diag(Y)), beta * (3 * eye - Dz @ Y) @ Dz
        else:
            T = 3 * eye - Z @ Y
            Y, Z = beta * Y @ T, beta * T @ Z
    Q = Z @ X / math.sqrt((3 - 1 / beta) * A.norm())
    return Q.T if tall else Q


def nsds_whiten_reference(X: Tensor, steps: int = 2, beta: float = 0.4) -> Tensor:
    """SWAN's NSDS whitening: Newton-Schulz with Z kept diagonal inside each step."""
    return newton_schulz_whiten_reference(X, steps, beta, diagonal=True)


def swan_direction_reference(G: Tensor, ns_steps: int = 10, beta: float = 0.8, exact: bool = False) -> Tensor:
    """GradNorm, whitening (Newton-Schulz, or ``exact`` by eigendecomposition), scaled to entry RMS 1."""
    X = gradnorm_reference(G)
    X = whiten_reference(X) if exact else newton_schulz_whiten_reference(X, ns_steps, beta)
    return math.sqrt(X.numel()) * X / X.norm()


class _Reference(Optimizer):
    """``W <- W - lr * direction(G)`` for each matrix, computed in float64 and added in the weight's dtype."""

    def _direction(self, G: Tensor, group: dict) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(self._direction(p.grad.reshape(p.shape[0], -1), group).reshape(p.shape).to(p.dtype),
                           alpha=-group["lr"])
        return loss


class SinkGDReference(_Reference):
    """SinkGD as Algorithm 4 writes it (see the module docstring): stateless, float64, one matrix at a time."""

    def __init__(self, params, lr: float = 1e-3, iters: int = 5):
        super().__init__(params, dict(lr=lr, iters=iters))

    def _direction(self, G: Tensor, group: dict) -> Tensor:
        return sr_sinkhorn_reference(G, group["iters"])


class SWANReference(_Reference):
    """SWAN as the paper writes it (see the module docstring): stateless, float64, one matrix at a time."""

    def __init__(self, params, lr: float = 1e-3, ns_steps: int = 10, beta: float = 0.8, exact: bool = False):
        super().__init__(params, dict(lr=lr, ns_steps=ns_steps, beta=beta, exact=exact))

    def _direction(self, G: Tensor, group: dict) -> Tensor:
        return swan_direction_reference(G, group["ns_steps"], group["beta"], group["exact"])
