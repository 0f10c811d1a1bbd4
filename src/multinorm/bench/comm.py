"""Communication of the optimizer step on several ranks, counted in one process.

    python -m multinorm.bench.comm --out results/bench

Beyond the gradient reduction, a stateless optimizer on sharded parameters issues its own collectives
(:mod:`multinorm.optim.distributed`). This module counts them without GPUs: one CPU process per rank
joins a gloo process group, builds the hidden matrices as FSDP2 would hold them (``Shard(0)`` DTensors
on a 1-D mesh) or as DDP replicas, runs one step and records every ``torch.distributed`` collective the
step calls and its payload; the recording wrappers return at once without communicating (every rank
issues the same calls, so none waits for another). A ``CommDebugMode`` around the step checks that no
collective went past the wrappers (DTensor's own, for instance).

Payload (``bytes_per_rank``) follows the nccl-tests convention for a collective's size S: the buffer of
an all-reduce, the gathered output of an all-gather, the larger of the send and receive buffers of an
all-to-all; a row reports the busiest rank. :func:`formula` gives the same counts and bytes in closed
form; the benchmark checks it against the counts at the simulated shapes (the real ones for one 1B
block under FSDP2, smaller ones where a step on the real shapes would be too heavy for a CPU) and writes
the formula's values at the real shapes. Files in ``--out``:

* ``communication.csv`` -- per setting (``block-1b``: the 7 hidden matrices of one LLaMA-1B decoder
  layer; ``hidden-1b``: the 168 of the whole model), layout (fsdp, ddp), world size and optimizer: each
  collective's calls and bytes per step;
* ``communication_model.csv`` -- a model, not a measurement: the step-time overhead of those
  collectives at 8 GPUs for the 1B model, ``latency x calls + bytes x factor / bus bandwidth``;
* ``readme_communication.md`` -- the README table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from ..io import atomic_write
from ..optim.distributed import assign_owners, shard_sizes
from .steps import BLOCK_1B_SHAPES

__all__ = ["COLLECTIVES", "CollectiveCounter", "simulate_step", "count_steps", "count_step", "formula",
           "communication_table", "model_table", "readme_markdown", "main"]

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
               "reduce_scatter", "reduce_scatter_tensor", "broadcast")
OPTIMIZERS = ("adamw", "sinkgd", "mngd", "swan")
LAYOUTS = ("fsdp", "ddp")
WORLD_SIZES = (2, 4, 8)
ITERS = 5  # SinkGD's and MNGD's L (their defaults)
FP32 = 4
# the cost model (assumptions, not measurements): one NVLink node of 8 GPUs
MODEL_WORLD = 8
LATENCY_US = 10.0
BUS_BANDWIDTH_GBPS = 200.0
# nccl-tests' bus-bandwidth factor: time = latency + S * factor(n) / bus bandwidth
BUS_FACTORS = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
               "all_to_all_single": lambda n: (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n}
COMM_COLUMNS = ["setting", "layout", "world_size", "optimizer", "collective", "calls", "bytes_per_rank",
                "counted_at_shrink"]
MODEL_COLUMNS = ["setting", "layout", "world_size", "optimizer", "calls", "bytes_per_rank", "latency_us",
                 "bus_bandwidth_GBps", "latency_ms", "transfer_ms", "overhead_ms", "grad_reduction_ms",
                 "overhead_vs_grad_reduction"]


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(t) for t in x)
    return 0


class CollectiveCounter:
    """Within ``counting()``: every call of a ``torch.distributed`` collective (``COLLECTIVES``) is recorded
    in ``calls`` as ``(name, input bytes, output bytes)`` and returns without communicating (the step's
    numbers are then wrong, its calls and payloads are not). ``dispatched`` counts the collectives that reached the process group anyway, by another route
    (DTensor's functional collectives, for instance), as ``CommDebugMode`` sees them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.dispatched = 0

    def _wrap(self, name: str):
        def counting(*args, **kwargs):
            first, second = (args + (None, None))[:2]
            if name in ("all_reduce", "broadcast"):
                sizes = (_bytes(first), _bytes(first))
            else:  # (output, input, ...)
                sizes = (_bytes(kwargs.get("input_tensor", kwargs.get("tensor", second))),
                         _bytes(kwargs.get("output_tensor", kwargs.get("tensor_list", first))))
            self.calls.append((name,) + sizes)
            return None
        return counting

    @contextlib.contextmanager
    def counting(self) -> Iterator[CollectiveCounter]:
        from torch.distributed.tensor.debug import CommDebugMode

        real = {name: getattr(dist, name) for name in COLLECTIVES}
        mode = CommDebugMode()
        for name in real:
            setattr(dist, name, self._wrap(name))
        try:
            with mode:
                yield self
        finally:
            for name, fn in real.items():
                setattr(dist, name, fn)
            self.dispatched += mode.get_total_counts()


def _make_optimizer(name: str, params: list, replica_group=None):
    from ..optim import MNGD, SWAN, SinkGD

    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    opt = {"sinkgd": SinkGD, "mngd": MNGD, "swan": SWAN}[name](params, lr=1e-3, replica_group=replica_group)
    if name == "swan":
        # the whitening needs no collective and is the step's heavy part: the identity stands in for it
        opt._directions = lambda groups, mats: [m.float() for m in mats]
    return opt


def simulate_step(name: str, layout: str, shapes: Sequence[tuple[int, int]], mesh) -> CollectiveCounter:
    """One step of optimizer ``name`` on ``shapes`` as this rank of ``mesh`` holds them (``layout`` fsdp:
    ``Shard(0)`` DTensors; ddp: whole replicas, the work split over the ``replica_group`` given at construction), counted."""
    from torch.distributed.tensor import DTensor, Shard

    world, rank = mesh.size(), mesh.get_local_rank()
    gen = torch.Generator().manual_seed(rank)
    params = []
    for m, n in shapes:
        rows = m if layout == "ddp" else shard_sizes(m, world)[rank]
        w, g = torch.randn(rows, n, generator=gen), torch.randn(rows, n, generator=gen)
        if layout == "fsdp":
            make = lambda t: DTensor.from_local(t, mesh, [Shard(0)], run_check=False,  # noqa: E731
                                                shape=torch.Size((m, n)), stride=(n, 1))
            w, g = make(w), make(g)
        p = torch.nn.Parameter(w)
        p.grad = g
        params.append(p)
    opt = _make_optimizer(name, params, dist.group.WORLD if layout == "ddp" else None)
    counter = CollectiveCounter()
    with counter.counting():
        opt.step()
    return counter


def _summary(calls: list[tuple[str, int, int]]) -> dict[str, tuple[int, int]]:
    """{collective: (calls, total bytes)}, a call's bytes being the larger of its input and output."""
    out: dict[str, tuple[int, int]] = {}
    for name, sent, received in calls:
        c, b = out.get(name, (0, 0))
        out[name] = (c + 1, b + max(sent, received))
    return out


Job = tuple[str, str, Sequence[tuple[int, int]]]  # (optimizer, layout, shapes)


def _rank_main(rank: int, world: int, rendezvous: str, jobs: list[Job], out: str) -> None:
    """One rank of :func:`count_steps`: every job's step, counted; the summaries written to ``out<rank>``."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = []
        for name, layout, shapes in jobs:
            counter = simulate_step(name, layout, shapes, mesh)
            results.append({"dispatched": counter.dispatched, "calls": _summary(counter.calls)})
        Path(f"{out}{rank}").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def count_steps(jobs: Sequence[Job], world: int) -> list[dict[str, tuple[int, int]]]:
    """{collective: (calls, bytes)} of one step of each job, counted on ``world`` CPU processes (one per
    rank, spawned once for all the jobs): the calls of rank 0 (every rank calls the same collectives) and
    the bytes of the busiest rank. Raises if a collective escaped the count or the ranks disagree."""
    import torch.multiprocessing as mp

    jobs = [(name, layout, [tuple(s) for s in shapes]) for name, layout, shapes in jobs]
    with tempfile.TemporaryDirectory(prefix="multinorm-comm-") as tmp:
        mp.spawn(_rank_main, args=(world, f"{tmp}/rendezvous", jobs, f"{tmp}/rank"), nprocs=world, join=True)
        ranks = [json.loads(Path(f"{tmp}/rank{r}").read_text()) for r in range(world)]
    counted = []
    for j, (name, layout, _) in enumerate(jobs):
        per_rank = []
        for results in ranks:
            if results[j]["dispatched"]:
                raise RuntimeError(f"{name} ({layout}): {results[j]['dispatched']} collectives escaped the count")
            per_rank.append({k: tuple(v) for k, v in results[j]["calls"].items()})
        if any(s.keys() != per_rank[0].keys() or any(s[k][0] != per_rank[0][k][0] for k in s) for s in per_rank):
            raise RuntimeError(f"{name} ({layout}): the ranks issue different collectives: {per_rank}")
        counted.append({k: (c, max(s[k][1] for s in per_rank)) for k, (c, _) in per_rank[0].items()})
    return counted


def count_step(name: str, layout: str, shapes: Sequence[tuple[int, int]], world: int) -> dict[str, tuple[int, int]]:
    """:func:`count_steps` of one job."""
    return count_steps([(name, layout, shapes)], world)[0]


def formula(name: str, layout: str, shapes: Sequence[tuple[int, int]], world: int,
            iters: int = ITERS) -> dict[str, tuple[int, int]]:
    """{collective: (calls, bytes of the busiest rank)} of one step in closed form (fp32 gradients;
    SinkGD and MNGD with ``iters`` and their default options, MNGD's norms ("row", "col")).

    With M matrices (m_i, n_i) split by rows (fsdp): SinkGD makes L + 2 all-reduces, of M maxima, M totals
    and L times the column sums, ``4 (2M + L sum n_i)`` bytes; MNGD 5 per pass (per operator the maxima
    and the squared norms, M each; "col" also the column sums), ``4 L (4M + sum n_i)`` bytes; SWAN two
    all-to-alls, each the larger of a rank's blocks of all matrices and the matrices it owns. Under DDP
    only SWAN communicates: one all-gather of ``world`` x the largest owned share. AdamW: none."""
    M, cols = len(shapes), sum(n for _, n in shapes)
    if name == "adamw" or (layout == "ddp" and name != "swan"):
        return {}
    if name == "sinkgd":
        return {"all_reduce": (iters + 2, FP32 * (2 * M + iters * cols))}
    if name == "mngd":
        return {"all_reduce": (5 * iters, FP32 * iters * (4 * M + cols))}
    numels = [m * n for m, n in shapes]
    owners = assign_owners(numels, world)
    owned = [sum(k for k, o in zip(numels, owners) if o == r) for r in range(world)]
    if layout == "ddp":
        return {"all_gather": (1, FP32 * world * max(owned))}
    local = [sum(shard_sizes(m, world)[r] * n for m, n in shapes) for r in range(world)]
    return {"all_to_all_single": (2, 2 * FP32 * max(max(a, b) for a, b in zip(local, owned)))}


def _settings() -> dict[str, list[tuple[int, int]]]:
    from ..llama import build_model, split_parameters

    model = build_model("1b", device="meta")
    return {"block-1b": list(BLOCK_1B_SHAPES.values()),
            "hidden-1b": [tuple(p.shape) for _, p in split_parameters(model)[0]]}


def _shrink(setting: str, layout: str) -> int:
    """The shapes are divided by this to count: one block under FSDP is counted at its real shapes."""
    return 1 if (setting, layout) == ("block-1b", "fsdp") else 16


def communication_table(world_sizes: Sequence[int] = WORLD_SIZES, optimizers: Sequence[str] = OPTIMIZERS,
                        log=print) -> pd.DataFrame:
    """The rows of ``communication.csv``: counted at the shrunk shapes, checked against :func:`formula`
    there, reported by the formula at the real shapes (a row ``none`` where a step issues nothing)."""
    settings = _settings()
    cases = [(setting, layout, world, name, [(m // _shrink(setting, layout), n // _shrink(setting, layout))
                                             for m, n in shapes])
             for setting, shapes in settings.items() for layout in LAYOUTS for world in world_sizes
             for name in optimizers]
    counts = {}
    for world in world_sizes:  # one set of rank processes per world size
        mine = [c for c in cases if c[2] == world]
        counts.update(zip([c[:4] for c in mine], count_steps([(c[3], c[1], c[4]) for c in mine], world)))
    rows = []
    for setting, shapes in settings.items():
        for layout in LAYOUTS:
            shrink = _shrink(setting, layout)
            small = [(m // shrink, n // shrink) for m, n in shapes]
            for world in world_sizes:
                for name in optimizers:
                    counted = counts[setting, layout, world, name]
                    if counted != formula(name, layout, small, world):
                        raise RuntimeError(f"{setting} {layout} {world} {name}: counted {counted}, "
                                           f"formula {formula(name, layout, small, world)}")
                    log(f"{setting} {layout} world {world} {name}: {counted or 'no collective'} (shapes / {shrink})")
                    real = formula(name, layout, shapes, world) or {"none": (0, 0)}
                    rows += [dict(setting=setting, layout=layout, world_size=world, optimizer=name, collective=k,
                                  calls=c, bytes_per_rank=b, counted_at_shrink=shrink) for k, (c, b) in real.items()]
    return pd.DataFrame(rows, columns=COMM_COLUMNS)


def _transfer_s(collective: str, size: float, world: int) -> float:
    return size * BUS_FACTORS[collective](world) / (BUS_BANDWIDTH_GBPS * 1e9)


def model_table(comm: pd.DataFrame, setting: str = "hidden-1b", world: int = MODEL_WORLD) -> pd.DataFrame:
    """The modelled overhead of each optimizer's collectives (a model: ``LATENCY_US`` per collective and
    ``BUS_BANDWIDTH_GBPS`` bus bandwidth), beside the same model of the gradient reduction of the same
    matrices in fp32 (fsdp: a reduce-scatter; ddp: an all-reduce)."""
    shapes = _settings()[setting]
    grad_bytes = FP32 * sum(m * n for m, n in shapes)
    rows = []
    for (layout, name), part in comm[(comm.setting == setting) & (comm.world_size == world)].groupby(
            ["layout", "optimizer"], sort=False):
        part = part[part.collective != "none"]
        calls, size = int(part.calls.sum()), int(part.bytes_per_rank.sum())
        transfer = sum(_transfer_s(k, b, world) for k, b in zip(part.collective, part.bytes_per_rank))
        latency = calls * LATENCY_US * 1e-6
        reduction = "reduce_scatter" if layout == "fsdp" else "all_reduce"
        grad = LATENCY_US * 1e-6 + _transfer_s(reduction, grad_bytes, world)
        rows.append(dict(setting=setting, layout=layout, world_size=world, optimizer=name, calls=calls,
                         bytes_per_rank=size, latency_us=LATENCY_US, bus_bandwidth_GBps=BUS_BANDWIDTH_GBPS,
                         latency_ms=latency * 1e3, transfer_ms=transfer * 1e3, overhead_ms=(latency + transfer) * 1e3,
                         grad_reduction_ms=grad * 1e3, overhead_vs_grad_reduction=(latency + transfer) / grad))
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


def _size(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:g} B"


def readme_markdown(comm: pd.DataFrame, model: pd.DataFrame) -> str:
    """The README subsection: calls and bytes per step at each world size, and the modelled overhead."""
    lines = ["<!-- written by `python -m multinorm.bench.comm`; edits are overwritten -->",
             "Collectives each optimizer adds to a step beyond the gradient reduction, for the 168 hidden matrices "
             "of LLaMA-1B in fp32 (`results/bench/communication.csv`, also one 1B block): calls per step and "
             "payload of the busiest rank (all-reduce buffer, all-gather output, larger all-to-all buffer). "
             "Counted with one CPU process per rank on a gloo process group, at shapes / 16; the bytes "
             "at the real shapes come from the closed form checked against those counts (and against the counts "
             "of one 1B block under FSDP2 at its real shapes). FSDP2 shards rows (`Shard(0)`); AdamW's sharded "
             "step is elementwise and issues none.", "",
             "| layout | optimizer | collective | calls | " + " | ".join(f"{w} ranks" for w in WORLD_SIZES) + " |",
             "|---|---|---|---:|" + "---:|" * len(WORLD_SIZES)]
    full = comm[comm.setting == "hidden-1b"]
    for (layout, name, collective), part in full.groupby(["layout", "optimizer", "collective"], sort=False):
        sizes = {int(w): int(b) for w, b in zip(part.world_size, part.bytes_per_rank)}
        lines.append(f"| {layout} | {name} | {collective} | {int(part.calls.iloc[0])} | "
                     + " | ".join(_size(sizes.get(w, 0)) for w in WORLD_SIZES) + " |")
    lat, bw = model.latency_us.iloc[0], model.bus_bandwidth_GBps.iloc[0]
    lines += ["", f"Modelled, not measured (`communication_model.csv`): overhead at {MODEL_WORLD} GPUs = "
              f"{lat:g} µs × calls + bytes × bus factor / {bw:g} GB/s (nccl-tests' bus factors: 2(n-1)/n for "
              "all-reduce, (n-1)/n otherwise), beside the same model of the fp32 gradient reduction of these "
              "matrices (FSDP: reduce-scatter; DDP: all-reduce).", "",
              "| layout | optimizer | calls | overhead (ms) | gradient reduction (ms) | ratio |",
              "|---|---|---:|---:|---:|---:|"]
    for r in model.itertuples():
        lines.append(f"| {r.layout} | {r.optimizer} | {r.calls} | {r.overhead_ms:.3g} | {r.grad_reduction_ms:.3g} | "
                     f"{r.overhead_vs_grad_reduction:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m multinorm.bench.comm", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/bench", help="folder for the CSVs and readme_communication.md")
    p.add_argument("--tables-only", action="store_true",
                   help="rebuild communication_model.csv and readme_communication.md from communication.csv")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tables_only:
        comm = pd.read_csv(out / "communication.csv")
    else:
        comm = communication_table()
        atomic_write(out / "communication.csv", comm.to_csv(index=False))
    model = model_table(comm)
    atomic_write(out / "communication_model.csv", model.to_csv(index=False, float_format="%.6g"))
    atomic_write(out / "readme_communication.md", readme_markdown(comm, model))
    print(model.to_string(index=False))


if __name__ == "__main__":
    main()
