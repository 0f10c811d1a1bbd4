"""Checkpoints of runs on several processes, in torch.distributed.checkpoint's format (a folder).

``<run>/checkpoint.dcp/`` holds the model and optimizer state, written by all ranks together (each its
own shards, so a checkpoint written by N ranks loads on M ranks, or in one process, whatever the DDP or
FSDP2 layout), and ``trainer.pt``, the trainer's own state (step, tokens, wall time, loss window,
scheduler), written by rank 0. A new checkpoint is written to ``checkpoint.dcp.tmp/`` and swapped in by
two renames once complete, so a process killed during a write leaves the previous checkpoint (as
``checkpoint.dcp/``, or as ``checkpoint.dcp.old/`` if killed between the renames; :func:`find` looks at both).

The stateless matrix optimizers keep no state, so optimizer states are loaded non-strictly (only AdamW's
entries exist). A single-process ``checkpoint.pt`` (model and optimizer state dicts in full) loads on
several ranks through :func:`load_full`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import atomic_write
from .parallel import Parallel

__all__ = ["NAME", "find", "remove", "save", "load", "load_full", "read_trainer_state"]

NAME = "checkpoint.dcp"
TRAINER_STATE = "trainer.pt"


def _paths(run_dir: Path) -> tuple[Path, Path, Path]:
    """(the committed checkpoint, the one being written, the previous one during the swap)."""
    return run_dir / NAME, run_dir / f"{NAME}.tmp", run_dir / f"{NAME}.old"


def find(run_dir: Path) -> Path | None:
    """The folder of the run's newest complete distributed checkpoint, or None."""
    final, _, old = _paths(run_dir)
    for folder in (final, old):
        if (folder / TRAINER_STATE).exists() and (folder / ".metadata").exists():
            return folder
    return None


def remove(run_dir: Path) -> None:
    """Delete the run's distributed checkpoints (all three folders)."""
    for folder in _paths(run_dir):
        shutil.rmtree(folder, ignore_errors=True)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)


def save(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
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


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
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
