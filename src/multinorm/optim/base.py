"""Shared step loop of the stateless matrix optimizers (SinkGD, SWAN, MNGD)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["StatelessMatrixOptimizer"]


class StatelessMatrixOptimizer(Optimizer):
    r"""Base class: ``W <- W (1 - lr wd) - lr * direction(grad)`` with no per-parameter state.

    Subclasses implement :meth:`direction`, a pure function of one gradient matrix and the group's
    hyperparameters. Parameters must be matrices: a weight of more than two dims is treated as the matrix
    ``[shape[0], prod(shape[1:])]`` (rows = output units, as for a flattened conv kernel); vectors and
    scalars are rejected, since their natural optimizer (AdamW) keeps state -- route them with
    :func:`multinorm.optim.build_optimizer`. Gradients are processed in float32 (float64 for float64
    parameters) and the update is added to the parameter in its own dtype.
    """

    def __init__(self, params, defaults: dict) -> None:
        lr = defaults["lr"]
        if isinstance(lr, Tensor) or not lr >= 0.0:
            raise ValueError(f"{type(self).__name__}: lr must be a float >= 0, got {lr!r}")
        if not defaults.get("weight_decay", 0.0) >= 0.0:
            raise ValueError(f"{type(self).__name__}: weight_decay must be >= 0, got {defaults['weight_decay']}")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.ndim < 2:
                raise ValueError(
                    f"{type(self).__name__} updates matrices only, but got a parameter of shape {tuple(p.shape)}; "
                    "optimize vectors (norm gains, biases) with AdamW, e.g. via multinorm.optim.build_optimizer"
                )
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} needs real floating-point parameters, got {p.dtype}")

    def direction(self, grad: Tensor, group: dict) -> Tensor:
        """The update direction for one gradient matrix (m, n) in the compute dtype."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """Performs a single optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
                matrix = grad.reshape(grad.shape[0], -1).to(compute)
                update = self.direction(matrix, group)
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                p.add_(update.reshape(p.shape), alpha=-lr)
        return loss
