"""Checkpoints of a run: ``checkpoint.pt`` from one process, ``checkpoint.dcp/`` from several.

**One process.** ``checkpoint.pt`` holds model, optimizer, scheduler and step (:func:`save_single`, written
atomically); :func:`load_checkpoint` reads it with ``weights_only=True`` and names what it refuses.

**Several processes**, in torch.distributed.checkpoint's format (a folder).
``<run>/checkpoint.dcp/`` holds the model and optimizer state, written by all ranks together (each its
own shards, so a checkpoint written by N ranks loads on M ranks, or in one process, whatever the DDP or
FSDP2 layout), and ``trainer.pt``, the trainer's own state (step, tokens, wall time, loss window,
scheduler), written by rank 0. A new checkpoint is written to ``checkpoint.dcp.tmp/`` and swapped in by
two renames once complete, so a process killed during a write leaves the previous checkpoint (as
``checkpoint.dcp/``, or as ``checkpoint.dcp.old/`` if killed between the renames; :func:`find_sharded` looks at both).

The stateless matrix optimizers keep no state, so optimizer states are loaded non-strictly (only AdamW's
entries exist). A single-process ``checkpoint.pt`` (model and optimizer state dicts in full) loads on
several ranks through :func:`load_full`.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from multinorm.io import atomic_write
from multinorm.parallel import Parallel

from .config import ConfigError, one_line

__all__ = ["save_single", "load_checkpoint", "read_checkpoint", "restore", "NAME", "find_sharded", "remove_sharded",
           "save_sharded", "load_sharded", "load_full", "read_trainer_state"]

def save_single(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))  # a crash mid-save leaves the previous checkpoint


# Classes that GaLore, APOLLO and Fira keep in their optimizer state, one projector per matrix: plain
# holders of a rank, a gap, a scale and an orthogonal-matrix tensor. Listed by name so that a resume
# imports only the package its checkpoint needs (importing all three takes seconds).
_PROJECTOR_CLASSES = (
    "galore_torch.galore_projector.GaLoreProjector",
    "apollo_torch.random_projector.GradientProjector",
    "apollo_torch.svd_projector.GaLoreProjector",
    "fira.gradient_projection.GradientProjector",
)


# numpy scalars: a learning rate that came from numpy, in checkpoints written before TrainConfig turned
# such values into Python numbers. Rebuilding one runs no code beyond numpy's own.
_NUMPY_SCALAR = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")


def _numpy_scalar_types() -> list[Any]:
    """What unpickling a numpy scalar touches: its reconstructor, np.dtype and the concrete dtype classes
    (the last are not listed by get_unsafe_globals_in_checkpoint, so all of them are allowed)."""
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [np._core.multiarray.scalar, np.dtype, *dtype_classes]


def _allowed_classes(path: Path) -> list[Any]:
    """The projector classes and numpy scalar types that the checkpoint at `path` refers to, imported."""
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    classes = []
    for name in sorted(unsafe & set(_PROJECTOR_CLASSES)):
        module, _, qualname = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), qualname))
    if unsafe & set(_NUMPY_SCALAR):
        classes += _numpy_scalar_types()
    return classes


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a run's checkpoint.pt safely: tensors, plain containers and the projector classes only.

    Raises ConfigError with a one-line message if the file is missing, truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_allowed_classes(path)):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on a damaged file
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = (f"it holds an object of a type that is not allowed to load ({unsafe.group(1)})" if unsafe
               else f"the file is corrupt or truncated ({one_line(exc)})")
        raise ConfigError(f"checkpoint {path} cannot be loaded: {why}") from None
    missing = {"model", "optimizer", "scheduler", "step"} - (set(ckpt) if isinstance(ckpt, dict) else set())
    if missing:
        raise ConfigError(f"{path} is not a training checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def read_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """The run's newest checkpoint: (its contents -- for a distributed checkpoint, the trainer state only --,
    the distributed checkpoint's folder or None). ConfigError if there is none or it cannot be read."""
    single = run_dir / "checkpoint.pt"
    folder = find_sharded(run_dir)
    try:
        if folder is None:
            return load_checkpoint(single), None
        try:
            state = read_trainer_state(folder)
        except Exception as exc:  # torch raises many kinds on a damaged file
            raise ConfigError(f"checkpoint {folder} cannot be loaded ({one_line(exc)})") from None
        if single.exists():  # both formats: the process stopped between writing one and deleting the other
            ckpt = load_checkpoint(single)
            if ckpt["step"] > state["step"]:
                return ckpt, None
        return state, folder
    except ConfigError as exc:
        raise ConfigError(f"cannot resume: {exc}") from None


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any], folder: Path | None,
             par: Parallel) -> None:
    """Model and optimizer state from a checkpoint of any layout into this one."""
    if folder is not None:
        load_sharded(folder, model, optimizer)
    elif par.distributed:
        load_full(model, optimizer, ckpt)
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])


NAME = "checkpoint.dcp"
TRAINER_STATE = "trainer.pt"


def _paths(run_dir: Path) -> tuple[Path, Path, Path]:
    """(the committed checkpoint, the one being written, the previous one during the swap)."""
    return run_dir / NAME, run_dir / f"{NAME}.tmp", run_dir / f"{NAME}.old"


def find_sharded(run_dir: Path) -> Path | None:
    """The folder of the run's newest complete distributed checkpoint, or None."""
    final, _, old = _paths(run_dir)
    for folder in (final, old):
        if (folder / TRAINER_STATE).exists() and (folder / ".metadata").exists():
            return folder
    return None


def remove_sharded(run_dir: Path) -> None:
    """Delete the run's distributed checkpoints (all three folders)."""
    for folder in _paths(run_dir):
        shutil.rmtree(folder, ignore_errors=True)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)


def save_sharded(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
         par: Parallel) -> None:
    """Write a checkpoint from all ranks (every rank calls this at the same step)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp, old = _paths(run_dir)
    par.on_main(lambda: shutil.rmtree(tmp, ignore_errors=True))  # left by a write that was killed
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp,
             no_dist=not torch.distributed.is_initialized())

    def commit() -> None:  # rank 0, once every rank has written its part
        atomic_write(tmp / TRAINER_STATE, lambda f: torch.save(trainer_state, f))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    par.barrier()
    par.on_main(commit)


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore the model and optimizer from a distributed checkpoint, resharded to this layout (any
    number of ranks, DDP, FSDP2, or one process without a process group). RuntimeError if it does not fit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    from torch.distributed.checkpoint.api import CheckpointException

    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to fill
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=folder, no_dist=not torch.distributed.is_initialized())
    except CheckpointException as exc:  # a BaseException; what it reports is a mismatch or a damaged file
        raise RuntimeError(str(exc)) from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))


def load_full(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: dict[str, Any]) -> None:
    """Restore a DDP or FSDP2 model and its optimizer from a single-process checkpoint that every rank has
    read whole. Its optimizer state numbers the parameters in ``param_groups`` order; that order maps
    them to the parameter names torch.distributed.checkpoint's state-dict API expects."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = {id(p): name for name, p in Parallel.unwrap(model).named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = checkpoint["optimizer"]
    named = {"state": {order[i]: entry for i, entry in saved["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_model_state_dict(model, checkpoint["model"], options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True, strict=False))
