"""Shared step loop and option checks of the stateless matrix optimizers (SinkGD, SWAN, MNGD)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..normalize import unit_max_root
from .distributed import Sharding, local_parts

__all__ = ["StatelessMatrixOptimizer", "check_options", "Check", "is_bool", "is_float_at_least", "is_int_at_least",
           "is_one_of", "compute_dtype", "prescale_roots", "BATCH_ELEMENTS", "ShardedBatch"]

# (option, predicate, requirement): the option is valid when predicate(value) is true; otherwise the error
# reads "<Owner>: <option> must be <requirement>, got <value!r>".
Check = tuple[str, Callable[[Any], bool], str]

# Same-shape matrices are updated together in batches of up to this many entries, per device type: enough
# to amortise the per-op cost of many small matrices, while a large matrix is updated on its own. On CPU a
# batch stays small enough for the caches to hold it across the 2L mat-vecs of SR-Sinkhorn.
BATCH_ELEMENTS = {"cpu": 1 << 20, "default": 1 << 22}


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_float_at_least(low: float, strict: bool = False) -> Callable[[Any], bool]:
    def ok(value: Any) -> bool:
        if isinstance(value, (bool, Tensor)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        return value > low if strict else value >= low
    return ok


def is_float_in(low: float, high: float) -> Callable[[Any], bool]:
    """A real number in ``[low, high)``."""
    at_least = is_float_at_least(low)
    return lambda value: at_least(value) and value < high


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

    Subclasses implement :meth:`direction`, a pure function of a batch of gradient matrices and the
    group's hyperparameters (or override :meth:`update_batch` to fuse the update into fewer passes), and
    list their options' checks in :meth:`_checks`. Every parameter group -- the constructor's too -- is
    checked once, when it is added (``add_param_group``), so a bad option fails there rather than at the
    first step.

    A step batches the matrices of a group by (shape, dtype, device), up to ``BATCH_ELEMENTS`` entries per
    batch (2^20 on CPU, 2^22 elsewhere), and never synchronises with the host (no ``.item()`` or
    ``bool(tensor)``), so it can be queued on an accelerator without stalls. Transient memory: one
    compute-dtype buffer the size of the largest batch (at most ``max(BATCH_ELEMENTS, largest matrix)``
    entries; SWAN needs two), plus the method's small vectors.

    ``maximize=True`` ascends: ``W <- W (1 - lr wd) + lr * direction(grad)``. The built-in directions are
    odd functions of the gradient (``P(-G) = -P(G)``), so this is descent on the negated objective.

    Parameters must be matrices: a weight of more than two dims is treated as the matrix
    ``[shape[0], prod(shape[1:])]`` (rows = output units, as for a flattened conv kernel); vectors and
    scalars are rejected, since their natural optimizer (AdamW) keeps state -- route them with
    :func:`multinorm.optim.build_optimizer`. Gradients are processed in float32 (float64 for float64
    parameters): a low-precision gradient is read once into the fp32 work buffer, and the fp32 update is
    added to the parameter in its own dtype (one rounding).
    
    ``replica_group`` (a torch.distributed process group, default None) declares the plain (not sharded)
    parameters replicas with equal gradients on every rank of that group, as under DistributedDataParallel: a
    method whose work is worth splitting (SWAN's whitening) then computes each matrix on one rank and shares the
    updates (every rank must step together). FSDP2-sharded (DTensor) parameters carry their own mesh.
    """

    def __init__(self, params, defaults: dict, replica_group: Any = None) -> None:
        self._scratch: dict = {}
        self._scratch_sizes: dict = {}
        # the process group over which the plain parameters are replicas with equal gradients (DDP), given at
        # construction as dion takes its mesh; None: every rank computes every matrix
        self.replica_group = replica_group
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

    def direction(self, grads: Tensor, group: dict) -> Tensor:
        """The update directions of a batch of gradient matrices ``grads`` (k, m, n).

        ``grads`` is a work buffer in the compute dtype (float32, or float64 for float64 gradients) that
        the method may overwrite; the result, (k, m, n) in the compute dtype, may be ``grads`` itself."""
        raise NotImplementedError

    def update_batch(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """One step for ``params`` of one group whose gradients, given as matrices, share shape (m, n),
        dtype and device. This default copies them into the work buffer (a low-precision gradient is
        converted there, once), calls :meth:`direction` and applies the result; subclasses may fuse more."""
        X = self.scratch((len(grads),) + tuple(grads[0].shape), compute_dtype(grads[0].dtype), grads[0].device)
        torch._foreach_copy_(list(X.unbind(0)), grads)
        self.apply_updates(group, params, list(self.direction(X, group).unbind(0)))

    def apply_updates(self, group: dict, params: list[Tensor], updates: list[Tensor],
                      factors: list[Tensor] | None = None) -> None:
        """``p <- p (1 - lr wd) - lr U * F`` (``+ lr U * F`` with maximize) for each parameter, its update U,
        an (m, n) compute-dtype tensor the caller owns (it may be overwritten), and its factor F, a tensor
        broadcastable to (m, n) multiplied in on the way (1 when ``factors`` is None).

        A 2-D parameter in the compute dtype is updated with two foreach calls (decay, then the update);
        any other (low precision, more than 2-D) gets ``alpha U F - lr wd p`` formed in U first, so p is
        rounded once.
        """
        lr, wd = group["lr"], group["weight_decay"]
        alpha = lr if group["maximize"] else -lr
        direct = [p.dtype == u.dtype and p.ndim == 2 for p, u in zip(params, updates)]
        if any(direct):
            ps = [p for p, d in zip(params, direct) if d]
            us = [u for u, d in zip(updates, direct) if d]
            if wd != 0.0:
                torch._foreach_mul_(ps, 1.0 - lr * wd)
            if factors is None:
                torch._foreach_add_(ps, us, alpha=alpha)
            else:
                torch._foreach_addcmul_(ps, us, [f for f, d in zip(factors, direct) if d], value=alpha)
        for i, (p, u) in enumerate(zip(params, updates)):
            if direct[i]:
                continue
            if factors is not None:
                u.mul_(factors[i])
            u = u.mul_(alpha).view(p.shape)
            if wd != 0.0:
                u.add_(p, alpha=-lr * wd)
            p.add_(u)

    def prescaled_copy(self, grads: list[Tensor], out: Tensor, square: bool = False) -> Tensor:
        """``out[i] <- q_i G_i`` in the compute dtype (``(q_i G_i)^2`` with ``square``), with q_i the exact
        power of four that brings ``max |q_i G_i|`` into (1/4, 1] (:func:`multinorm.normalize.unit_max_root`);
        returns ``sqrt(q)``, (k,). Each gradient is read once for its largest entry and once more into ``out``
        (converted there); the square is taken matrix by matrix, while each is still in cache."""
        root = prescale_roots(grads, out.dtype)
        for g, o, q in zip(grads, out, root.square().unbind(0)):
            torch.mul(g, q, out=o)
            if square:
                o.square_()
        return root

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: int = 0) -> Tensor:
        """A work buffer of ``shape`` and ``dtype``, valid until the next call with the same ``slot`` within
        this step (a method needing two buffers at once asks for slots 0 and 1).

        All batches of one step share one flat allocation per slot, sized for the step's largest batch: a
        fresh buffer per matrix costs page faults comparable to the whole (memory-bound) update on CPU.
        It is released when ``step`` returns, so nothing persists between steps.
        """
        numel = math.prod(shape)
        key = (device, dtype, slot)
        flat = self._scratch.get(key)
        if flat is None or flat.numel() < numel:
            largest = max(numel, self._scratch_sizes.get((device, dtype), 0))
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
        # Matrices of one group with the same shape, dtype and device are updated as one batch (up to
        # BATCH_ELEMENTS entries), which amortises the per-op cost of many small matrices.
        # A DTensor parameter is updated through its local block: replicated ones like plain tensors,
        # sharded ones by update_sharded, which completes their statistics with collectives.
        batches, sharded = [], []
        for group in self.param_groups:
            kinds: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                local, g, sharding = local_parts(p, type(self).__name__)
                g = self._direction_input(p, g, group)
                kinds.setdefault((g.shape, g.dtype, g.device, sharding), []).append((local, g))
            for (shape, _, _, sharding), items in kinds.items():
                if sharding is not None:
                    sharded.append(ShardedBatch(group, [p for p, _ in items], [g for _, g in items], sharding))
                    continue
                limit = BATCH_ELEMENTS.get(items[0][1].device.type, BATCH_ELEMENTS["default"])
                per = max(1, limit // shape.numel())
                batches += [(group, items[i:i + per]) for i in range(0, len(items), per)]
        self._scratch_sizes = {}
        for _, items in batches:
            g = items[0][1]
            key = (g.device, compute_dtype(g.dtype))
            self._scratch_sizes[key] = max(self._scratch_sizes.get(key, 0), len(items) * g.numel())
        if self.replica_group is not None and batches:
            self.update_replicated(batches)
        else:
            for group, items in batches:
                self.update_batch(group, [p for p, _ in items], [g for _, g in items])
        if sharded:
            if len({id(b.sharding.group) for b in sharded}) > 1:
                raise ValueError(f"{type(self).__name__}: sharded parameters must share one device mesh")
            self.update_sharded(sharded)

    def _direction_input(self, p: Tensor, g: Tensor, group: dict) -> Tensor:
        """The matrix whose direction the step takes for parameter ``p`` with (local) gradient ``g``: ``g``
        itself, or, with ``momentum`` beta > 0 in the group, the heavy-ball buffer ``m <- beta m + g`` kept in
        ``self.state[p]["momentum_buffer"]`` (the first step sets ``m = g``, as torch's SGD does)."""
        beta = group.get("momentum", 0.0)
        if not beta:
            return g
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = g.detach().clone(memory_format=torch.contiguous_format)
        else:
            buf.mul_(beta).add_(g)
        return buf

    def update_replicated(self, batches: list[tuple[dict, list[tuple[Tensor, Tensor]]]]) -> None:
        """The step of the replicated plain parameters when a ``replica_group`` was given. This default computes
        every matrix on every rank (right for methods as cheap as the exchange would be)."""
        for group, items in batches:
            self.update_batch(group, [p for p, _ in items], [g for _, g in items])

    def update_sharded(self, batches: list[ShardedBatch]) -> None:
        """One step for every sharded matrix of the step at once (all ranks call it together), given as
        batches of same-layout local blocks; a subclass that supports sharded parameters overrides it."""
        raise NotImplementedError(f"{type(self).__name__} does not support sharded (DTensor) parameters")


@dataclass
class ShardedBatch:
    """Same-shape local blocks of sharded matrices of one group: the blocks of the parameters (aliases,
    updated in place), of their gradients as matrices, and their common ``Sharding``."""

    group: dict
    params: list[Tensor]
    grads: list[Tensor]
    sharding: Sharding


def prescale_roots(grads: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``sqrt(q_i)`` (k,) in ``dtype`` of the exact prescale of each gradient (one read of each)."""
    lows, highs = zip(*[torch.aminmax(g) for g in grads])
    return unit_max_root(torch.maximum(torch.stack(highs), torch.stack(lows).neg_()), dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is processed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
