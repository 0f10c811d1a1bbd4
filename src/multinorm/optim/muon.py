"""``torch.optim.Muon`` with its Newton–Schulz iteration in a chosen precision.

torch's Muon orthogonalizes the momentum in bfloat16, as the reference implementation does on GPUs, where
bf16 matrix products are the fast ones. A CPU without bf16 matrix units emulates them: on the 2-core machine of
the studies a 128 x 352 bf16 product is 14x slower than in fp32, and a Muon step on ``nano`` cost more than the
model's forward and backward together. ``ns_dtype="auto"`` keeps bfloat16 on CUDA and runs the iteration in
float32 elsewhere.

torch exposes no hook for the iteration, so :class:`Muon` keeps torch's class (its arguments, defaults,
validation and state layout: ``state[p]["momentum_buffer"]``) and writes the step out with public operations,
op for op as torch's single-tensor step does it: with ``ns_dtype="bfloat16"`` it gives torch's numbers bit for
bit (``tests/test_muon.py``). Nothing of torch's private modules is used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Muon", "newton_schulz", "adjusted_lr", "NS_DTYPES"]

NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def newton_schulz(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float, *,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Muon's quintic Newton–Schulz map G -> ~U V^T (torch's iteration, step for step) computed in ``dtype``.

    With ``dtype=torch.bfloat16`` it is torch's iteration (the one ``torch.optim.Muon`` runs). The iteration runs on
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


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The learning rate of an A x B matrix under ``torch.optim.Muon``'s ``adjust_lr_fn`` rules: ``None`` or
    ``"original"``: lr * sqrt(max(1, A / B)); ``"match_rms_adamw"``: lr * 0.2 * sqrt(max(A, B)); else lr."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


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
        """One step of torch's Muon: per matrix, ``B <- mu B + (1 - mu) G`` (``lerp``), the Nesterov blend
        ``G + mu (B - G)`` (or ``B``), its Newton–Schulz orthogonalization in :meth:`_iteration_dtype`, decoupled
        weight decay, and the update at the shape-adjusted lr (:func:`adjusted_lr`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        dtype = self._iteration_dtype()
        for group in self.param_groups:
            lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
            weight_decay, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                if grad.ndim != 2:
                    raise ValueError("Param gradient must be a 2D matrix")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype=dtype)
                p.mul_(1 - lr * weight_decay)
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
