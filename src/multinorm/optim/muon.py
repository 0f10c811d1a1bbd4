"""``torch.optim.Muon`` with its Newton–Schulz iteration in a chosen precision.

torch's Muon orthogonalizes the momentum in bfloat16, as the reference implementation does on GPUs, where
bf16 matrix products are the fast ones. A CPU without bf16 matrix units emulates them: on the 2-core machine of
the studies a 128 x 352 bf16 product is 14x slower than in fp32, and a Muon step on ``nano`` cost more than the
model's forward and backward together. ``ns_dtype="auto"`` keeps bfloat16 on CUDA and runs the iteration in
float32 elsewhere; everything else (momentum, Nesterov, the quintic coefficients, the lr adjustment, weight
decay, the state) is torch's own code.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.optim._muon as _torch_muon
from torch import Tensor

__all__ = ["Muon", "newton_schulz", "NS_DTYPES"]

NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def newton_schulz(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float, *,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Muon's quintic Newton–Schulz map G -> ~U V^T (torch's iteration, step for step) computed in ``dtype``.

    With ``dtype=torch.bfloat16`` it is ``torch.optim._muon._zeropower_via_newtonschulz``. The iteration runs on
    the wide orientation (rows <= columns) after scaling G to Frobenius norm 1, so its spectral norm is <= 1:
    X <- a X + (b A + c A^2) X with A = X X^T.
    """
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.to(dtype)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextlib.contextmanager
def _iteration_in(dtype: torch.dtype) -> Iterator[None]:
    # torch's step looks the function up in its module at call time; swap it for the duration of one step.
    original = _torch_muon._zeropower_via_newtonschulz
    _torch_muon._zeropower_via_newtonschulz = functools.partial(newton_schulz, dtype=dtype)
    try:
        yield
    finally:
        _torch_muon._zeropower_via_newtonschulz = original


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (same arguments, same state) plus ``ns_dtype``: the precision of the Newton–Schulz
    iteration, ``"auto"`` (bfloat16 for CUDA parameters, float32 otherwise), ``"bfloat16"`` (torch's choice
    everywhere), ``"float32"`` or ``"float64"``."""

    def __init__(self, params, *args, ns_dtype: str = "auto", **kwargs):
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"Muon: ns_dtype must be one of {', '.join(NS_DTYPES)}, got {ns_dtype!r}")
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype

    def _iteration_dtype(self) -> torch.dtype:
        if NS_DTYPES[self.ns_dtype] is not None:
            return NS_DTYPES[self.ns_dtype]
        cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        return torch.bfloat16 if cuda else torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        with _iteration_in(self._iteration_dtype()):
            return super().step(closure)
