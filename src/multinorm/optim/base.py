"""Shared step loop and option checks of the stateless matrix optimizers (SinkGD, SWAN, MNGD)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["StatelessMatrixOptimizer", "check_options", "Check", "is_bool", "is_float_at_least", "is_int_at_least",
           "is_one_of"]

# (option, predicate, requirement): the option is valid when predicate(value) is true; otherwise the error
# reads "<Owner>: <option> must be <requirement>, got <value!r>".
Check = tuple[str, Callable[[Any], bool], str]


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_float_at_least(low: float, strict: bool = False) -> Callable[[Any], bool]:
    def ok(value: Any) -> bool:
        if isinstance(value, (bool, Tensor)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        return value > low if strict else value >= low
    return ok


def is_int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_one_of(choices: Sequence) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


def check_options(owner: str, options: Mapping[str, Any], checks: Sequence[Check]) -> None:
    """Raise ``ValueError("<owner>: <option> must be <requirement>, got <value!r>")`` for the first failing check."""
    for key, ok, requirement in checks:
        value = options[key]
        try:
            valid = bool(ok(value))
        except (TypeError, ValueError):  # e.g. comparing a string with a number
            valid = False
        if not valid:
            raise ValueError(f"{owner}: {key} must be {requirement}, got {value!r}")


class StatelessMatrixOptimizer(Optimizer):
    r"""Base class: ``W <- W (1 - lr wd) - lr * direction(grad)`` with no per-parameter state.

    Subclasses implement :meth:`direction`, a pure function of one gradient matrix and the group's
    hyperparameters, and list their options' checks in :meth:`_checks`. Every parameter group -- the
    constructor's too -- is checked once, when it is added (``add_param_group``), so a bad option fails
    there rather than at the first step.

    ``maximize=True`` ascends: ``W <- W (1 - lr wd) + lr * direction(grad)``. The built-in directions are
    odd functions of the gradient (``P(-G) = -P(G)``), so this is descent on the negated objective.

    Parameters must be matrices: a weight of more than two dims is treated as the matrix
    ``[shape[0], prod(shape[1:])]`` (rows = output units, as for a flattened conv kernel); vectors and
    scalars are rejected, since their natural optimizer (AdamW) keeps state -- route them with
    :func:`multinorm.optim.build_optimizer`. Gradients are processed in float32 (float64 for float64
    parameters): a low-precision gradient is read once into the fp32 work buffer, and the fp32 update is
    added to the parameter in its own dtype (one rounding).
    """

    def __init__(self, params, defaults: dict) -> None:
        self._scratch: dict = {}
        # torch's constructor adds each group through add_param_group, which checks the defaults too
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------------------
    # parameter groups

    def _checks(self, group: dict) -> list[Check]:
        """The checks every group must pass (subclasses extend the list)."""
        return [
            ("lr", is_float_at_least(0.0), "a float >= 0"),
            ("weight_decay", is_float_at_least(0.0), "a float >= 0"),
            ("maximize", is_bool, "a bool"),
        ]

    def _prepare_group(self, group: dict) -> None:
        """Fill or canonicalise a new group's options before they are checked (subclass hook)."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            name = type(self).__name__
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"{name} updates matrices only, but got a parameter of shape {tuple(p.shape)}; "
                        "optimize vectors (norm gains, biases) with AdamW, e.g. via multinorm.optim.build_optimizer"
                    )
                if not p.is_floating_point() or p.is_complex():
                    raise ValueError(f"{name} needs real floating-point parameters, got {p.dtype}")
            self._prepare_group(group)
            check_options(name, group, self._checks(group))
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    # ------------------------------------------------------------------------------------------------------
    # the step

    def direction(self, grad: Tensor, group: dict) -> Tensor:
        """The update direction for one gradient matrix (m, n), which may be in a low-precision dtype.

        Returns the compute dtype (float32, or float64 for float64 gradients). The result may be a view of
        :meth:`scratch`, since it is consumed before the next call."""
        raise NotImplementedError

    def scratch(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A work buffer of ``shape`` and ``dtype``, valid until the next call within this step.

        All calls of one step share one flat allocation sized for the step's largest gradient: a fresh
        m x n buffer per matrix costs page faults comparable to the whole (memory-bound) update on CPU.
        It is released when ``step`` returns, so nothing persists between steps.
        """
        numel = math.prod(shape)
        key = (device, dtype)
        flat = self._scratch.get(key)
        if flat is None or flat.numel() < numel:
            largest = max([p.grad.numel() for g in self.param_groups for p in g["params"] if p.grad is not None]
                          + [numel])
            flat = self._scratch[key] = torch.empty(largest, dtype=dtype, device=device)
        return flat[:numel].view(shape)

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
            alpha = lr if group["maximize"] else -lr
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                update = self.direction(grad.reshape(grad.shape[0], -1), group).reshape(p.shape)
                if update.dtype != p.dtype:
                    # low-precision p: form decay + update in the fp32 buffer, so p is rounded once
                    update.mul_(alpha)
                    if wd != 0.0:
                        update.add_(p, alpha=-lr * wd)
                    p.add_(update)
                else:
                    if wd != 0.0:
                        p.mul_(1.0 - lr * wd)
                    p.add_(update, alpha=alpha)
                del update  # keep one transient buffer alive at a time


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is processed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
