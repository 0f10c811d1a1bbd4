"""One optimizer made of child optimizers over disjoint parameter sets, and a state-size helper."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["CombinedOptimizer", "optimizer_state_bytes"]


class _ChainedState(Mapping):
    """Read view of the children's ``state`` dicts (a parameter's entry lives in its owner's dict)."""

    def __init__(self, optimizers: Sequence[Optimizer]):
        self._optimizers = optimizers

    def _owner(self, p: Tensor) -> Optimizer:
        for opt in self._optimizers:
            if any(q is p for g in opt.param_groups for q in g["params"]):
                return opt
        raise KeyError("tensor is not a parameter of this optimizer")

    def __getitem__(self, p: Tensor) -> Any:
        for opt in self._optimizers:
            if p in opt.state:
                return opt.state[p]
        return self._owner(p).state[p]  # children's state is a defaultdict, as in torch

    def __contains__(self, p: object) -> bool:
        return any(p in opt.state for opt in self._optimizers)

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


class CombinedOptimizer(Optimizer):
    """Steps several optimizers over disjoint parameter sets as one ``torch.optim.Optimizer``.

    ``param_groups`` is the concatenation of the children's group dicts -- the same dict objects -- so LR
    schedulers, gradient clipping utilities and anything else that edits ``group["lr"]`` act on the
    children. ``state`` is a read view of the children's states. ``step(closure)`` evaluates the closure
    once, then steps every child; ``zero_grad`` zeroes all; ``state_dict()`` merges the children's in
    torch's layout (so distributed checkpointing sees one optimizer) and ``load_state_dict`` restores each
    child (and re-links ``param_groups``). Groups cannot be added to the combination; add them to a child instead.
    """

    def __init__(self, optimizers: Sequence[Optimizer]):
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        for opt in optimizers:
            if not isinstance(opt, Optimizer):
                raise TypeError(f"CombinedOptimizer children must be torch.optim.Optimizer, got {type(opt).__name__}")
        self.optimizers = optimizers
        self._linked = False
        # The base class appends these very dicts to self.param_groups and checks that no parameter is
        # in two groups (across children too).
        super().__init__([g for opt in optimizers for g in opt.param_groups], defaults={})
        self._linked = True
        self.state = _ChainedState(self.optimizers)

    def add_param_group(self, param_group: dict) -> None:
        if self._linked:
            raise RuntimeError("CombinedOptimizer: add the parameter group to one of .optimizers instead")
        super().add_param_group(param_group)

    def _relink(self) -> None:
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """Evaluates ``closure`` (if given) once with grad enabled, then steps every child."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The children's state dicts merged into one in torch's own layout (``{"state", "param_groups"}``,
        parameters numbered in the order of ``param_groups``), so torch.distributed.checkpoint's
        ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` treat the combination as one optimizer."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.optimizers:
            child = opt.state_dict()
            state.update({offset + index: entry for index, entry in child["state"].items()})
            groups += [{**g, "params": [offset + index for index in g["params"]]} for g in child["param_groups"]]
            offset += sum(len(g["params"]) for g in child["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores each child from :meth:`state_dict`'s merged layout (or from the older
        ``{"optimizers": [child state dicts]}``), and re-links ``param_groups``."""
        if isinstance(state_dict, Mapping) and "optimizers" in state_dict:
            children = state_dict["optimizers"]
            if len(children) != len(self.optimizers):
                raise ValueError(f"CombinedOptimizer.load_state_dict expects {len(self.optimizers)} optimizers, "
                                 f"got {len(children)}")
        else:
            children = self._split(state_dict)
        for opt, child in zip(self.optimizers, children):
            opt.load_state_dict(child)
        # torch's load_state_dict replaces each child's group dicts; point ours at the new ones
        self._relink()

    def _split(self, state_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("CombinedOptimizer.load_state_dict expects {'state': ..., 'param_groups': [...]}")
        groups = list(state_dict["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"CombinedOptimizer.load_state_dict: {len(groups)} parameter groups given, "
                             f"{len(self.param_groups)} expected")
        children, start = [], 0
        for opt in self.optimizers:
            mine = groups[start:start + len(opt.param_groups)]
            start += len(opt.param_groups)
            # keys stay as given (ints, or names under torch.distributed.checkpoint): torch matches a
            # group's saved parameters to the current ones by position
            wanted = {key for g in mine for key in g["params"]}
            children.append({"state": {key: entry for key, entry in state_dict["state"].items() if key in wanted},
                             "param_groups": mine})
        return children

    def __getstate__(self) -> dict[str, Any]:  # pickling/deepcopy keep the children
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = "\n".join("  " + repr(opt).replace("\n", "\n  ") for opt in self.optimizers)
        return f"{type(self).__name__}(\n{inner}\n)"


def _tensor_bytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    if depth > 8 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        # e.g. the projector objects GaLore/APOLLO/Fira keep in their state
        return sum(_tensor_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


def optimizer_state_bytes(optimizer: Optimizer, params: Iterable[Tensor] | None = None) -> int:
    """Bytes of all tensors held in ``optimizer.state`` (children included; tensors inside state objects
    such as low-rank projectors count too; each tensor once). With ``params``, only their entries count."""
    optimizers = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    wanted = None if params is None else {id(p) for p in params}
    seen: set[int] = set()
    total = 0
    for opt in optimizers:
        for p, entry in opt.state.items():
            if wanted is None or id(p) in wanted:
                total += _tensor_bytes(entry, seen)
    return total
