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
        self._scratch: dict = {}
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
        """The update direction for one gradient matrix (m, n) in the compute dtype. It may be a view of
        :meth:`scratch`, since it is consumed before the next call."""
        raise NotImplementedError

    def scratch(self, like: Tensor) -> Tensor:
        """A work buffer shaped and typed like ``like``, valid until the next call within this step.

        All calls of one step share one flat allocation sized for the step's largest gradient: a fresh
        m x n buffer per matrix costs page faults comparable to the whole (memory-bound) update on CPU.
        It is released when ``step`` returns, so nothing persists between steps.
        """
        key = (like.device, like.dtype)
        flat = self._scratch.get(key)
        if flat is None or flat.numel() < like.numel():
            largest = max([p.grad.numel() for g in self.param_groups for p in g["params"] if p.grad is not None]
                          + [like.numel()])
            flat = self._scratch[key] = torch.empty(largest, dtype=like.dtype, device=like.device)
        return flat[: like.numel()].view(like.shape)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """Performs a single optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._scratch = {}
        try:
            self._update_all()
        finally:
            self._scratch = {}
        return loss

    def _update_all(self) -> None:
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
                del update, matrix  # keep one transient buffer alive at a time
