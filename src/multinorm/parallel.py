"""Training on several processes launched by torchrun: the process group, DDP / FSDP2 wrapping, collectives.

torchrun starts one process per device and tells each its place in ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``. :meth:`Parallel.plan` reads them (a process started without torchrun is the single-process
layout, which never creates a process group); :meth:`Parallel.start` joins the group (NCCL on CUDA, gloo
on CPU); :meth:`Parallel.wrap` puts the model under ``DistributedDataParallel`` ("ddp": every rank holds
the whole model, gradients are averaged by all-reduce) or FSDP2's ``fully_shard`` ("fsdp": each decoder
block and the root hold 1/N of their parameters, gradients are averaged by reduce-scatter).

Every rank reads the whole batch of a step and keeps its own equal share of the rows (:meth:`rows`), so N
ranks see the batches of the single-process run. The helpers below are no-ops in the single-process
layout, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["MODES", "Parallel", "launch_rank"]

MODES = ("ddp", "fsdp")

T = TypeVar("T")


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class Parallel:
    """How this process takes part in a run: ``mode`` ("single", "ddp" or "fsdp"), its ``rank`` among
    ``world`` processes, and the ``device`` it computes on."""

    mode: str = "single"
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def plan(cls, requested: str | None, device: str) -> Parallel:
        """The layout from torchrun's environment. ``requested``: "ddp", "fsdp" or None (DDP when torchrun
        started several processes, else a single process). Raises ValueError for "ddp"/"fsdp" without
        torchrun, an unknown mode, or a device that names one GPU for all ranks."""
        if requested is not None and requested not in MODES:
            raise ValueError(f"unknown parallel mode {requested!r}; valid: {', '.join(MODES)}")
        world = int(os.environ.get("WORLD_SIZE", "0"))
        if world < 1 or (requested is None and world == 1):
            if requested is not None:
                raise ValueError(f"--parallel {requested} needs processes started by torchrun, e.g. "
                                 f"torchrun --nproc-per-node 2 -m multinorm.train ... --parallel {requested}")
            return cls(device=torch.device(device))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            if ":" in device:
                raise ValueError(f"device {device!r} names one GPU, but each of the {world} processes uses the GPU "
                                 "of its local rank: pass --device cuda")
            device = f"cuda:{local_rank}"
        return cls(requested or "ddp", launch_rank(), world, torch.device(device))

    @property
    def distributed(self) -> bool:
        return self.mode != "single"

    @property
    def is_main(self) -> bool:
        """Rank 0, which alone writes the run record, logs and shows progress."""
        return self.rank == 0

    # ------------------------------------------------------------------------------------------------------
    # the process group

    def start(self) -> None:
        """Join the process group torchrun set up (its address comes from the environment)."""
        if not self.distributed:
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
        else:
            dist.init_process_group("gloo")

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ------------------------------------------------------------------------------------------------------
    # the model and optimizer

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train: DDP around it, or the model itself sharded in place by FSDP2 (each decoder
        block, then the root: embeddings, final norm and head). Build the optimizer after this, from
        :meth:`unwrap` (FSDP2 replaces the parameters by DTensors)."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # No buffer sync in forward: the only buffers (rotary frequencies) are computed alike on every
            # rank, and a sync would make a forward pass a collective.
            return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                           forward_sync_buffers=False)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.model.layers:
                fully_shard(block)
            fully_shard(model)
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The module with the model's own parameter names (inside DDP's wrapper; FSDP2 keeps the names)."""
        return getattr(model, "module", model)

    def replica_group(self) -> Any:
        """The process group whose ranks hold replicas of the model (DDP: all of them), for the optimizers'
        constructor (``build_optimizer(..., replica_group=...)``: SWAN then whitens each matrix on one rank and
        all-gathers the updates); None otherwise (one process, or FSDP2, whose shards carry their mesh)."""
        return dist.group.WORLD if self.mode == "ddp" else None

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Backward passes inside keep their gradients local unless ``last``: with gradient accumulation
        the ranks exchange gradients once per step, on the last micro-batch."""
        if last or not self.distributed:
            yield
        elif self.mode == "ddp":
            with model.no_sync():
                yield
        else:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

    # ------------------------------------------------------------------------------------------------------
    # data and results

    def rows(self, batch_size: int) -> slice:
        """This rank's equal share of a global batch of ``batch_size`` rows: [rank B/N, (rank + 1) B/N)."""
        share = batch_size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (in float64; one all-reduce)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def agree(self, loss: float, signum: int | None) -> tuple[float, int | None]:
        """(the mean of the ranks' losses, the largest signal number any rank received): every rank then
        makes the same decision to stop, at the same step. One all-gather."""
        if not self.distributed:
            return loss, signum
        mine = torch.tensor([loss, float(signum or 0)], dtype=torch.float64, device=self._comm_device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        table = torch.stack(parts).cpu()
        received = int(table[:, 1].max())
        return float(table[:, 0].sum()) / self.world, received or None

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 only (None elsewhere). An exception it raises is raised on every rank, so no
        rank goes on to wait for a rank that failed."""
        if not self.distributed:
            return fn()
        failure: list[Any] = [None]
        result = None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # sent to the other ranks, raised everywhere below
                failure[0] = exc
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise failure[0]
        return result

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on the others: for work that may fill a cache the others then read."""
        result = self.on_main(fn)
        return result if self.is_main else fn()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")
