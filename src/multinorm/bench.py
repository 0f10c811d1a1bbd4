"""Optimizer-step benchmark: time, state and transient memory of ``optimizer.step()`` per method.

    python -m multinorm.bench --out results/bench [--quick] [--threads 1] [--repeats 5]

Settings (all parameters trainable, gradients fixed, each optimizer built fresh):

* ``block-1b``: one transformer block at the 1b shapes -- q, k, v, o 2048 x 2048; gate, up 5461 x 2048;
  down 2048 x 5461 -- every matrix routed to the method (the registry builders, no AdamW group);
* ``micro``: the whole ``micro`` LLaMA (vocabulary 4096) through :func:`multinorm.optim.build_optimizer`,
  gradients from one forward/backward on random tokens;
* ``kernel``: fast (vector-form) versus literal alternating SR-Sinkhorn (L = 5) over the block's seven
  matrices, and Newton-Schulz whitening (10 steps, beta 0.8) versus the exact SVD polar factor over its
  q and down matrices.

Each row reports the median step time over ``--repeats`` timed steps (after warm-up steps; the first step
of GaLore/Fira computes SVD projectors and is excluded), its ratio to ``torch.optim.AdamW(foreach=True)``
timed in the same process on the same parameters (kernels: to their reference counterpart), the bytes of
tensors in ``optimizer.state`` (all, and for the hidden matrices), and the peak extra memory of one step.
Memory method: on CPU a ``TorchDispatchMode`` sees every aten op of one extra (untimed) step and tracks the
storages it creates until they are freed; the peak of their total is the step's transient memory (torch
exposes no CPU allocator statistics, and the process RSS misses buffers that malloc recycles). Library
workspaces outside torch tensors (LAPACK/BLAS) are not included. On CUDA it is
``torch.cuda.max_memory_allocated() - memory_allocated()`` around that step. Results go to
``<out>/optimizer_step.csv``; a table and the targets are printed (targets are reported, never enforced).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .llama import MODEL_CONFIGS, build_model, split_parameters
from .normalize import sr_sinkhorn, sr_sinkhorn_naive, whiten
from .optim import OPTIMIZERS, CombinedOptimizer, build_optimizer, optimizer_state_bytes

__all__ = ["main", "BenchRow", "BLOCK_1B_SHAPES"]

BLOCK_1B_SHAPES = {
    "q_proj": (2048, 2048), "k_proj": (2048, 2048), "v_proj": (2048, 2048), "o_proj": (2048, 2048),
    "gate_proj": (5461, 2048), "up_proj": (5461, 2048), "down_proj": (2048, 5461),
}
REFERENCE = "adamw-foreach"
# Methods whose block step takes tens of seconds on a CPU core (Newton-Schulz at d = 2048, SVD projectors).
SLOW_ON_CPU = {"swan", "muon", "galore", "fira"}
# The first step of these computes SVD projectors (then reused for update_proj_gap steps).
PROJECTOR_WARMUP = {"galore", "fira"}


@dataclass
class BenchRow:
    setting: str
    method: str
    device: str
    dtype: str
    threads: int
    median_ms: float
    repeats: int
    ratio: float | None
    baseline: str
    state_bytes: int | None
    hidden_state_bytes: int | None
    peak_extra_bytes: int | None
    memory_method: str
    note: str = ""


# ------------------------------------------------------------------------------------------------------------
# measurement


class _AllocationTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created under this mode and alive at the same time.

    Every aten op's outputs are inspected; a storage not among ``existing`` (parameters, gradients,
    optimizer state) is new and counted until it is freed (checked through weak references before each
    op). Scratch memory that libraries allocate outside torch tensors (LAPACK/BLAS workspaces) is not seen.
    """

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing = existing
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.existing and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _tensors_in(obj, seen: set[int] | None = None, depth: int = 0) -> list[torch.Tensor]:
    """Tensors reachable from obj through containers and object attributes (e.g. state projectors)."""
    seen = set() if seen is None else seen
    if depth > 8 or id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in _tensors_in(item, seen, depth + 1)]


def peak_extra_bytes(fn: Callable[[], object], roots: object, device: torch.device) -> tuple[int, str]:
    """Peak memory that one call of ``fn`` allocates on top of what exists (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    existing = {t.untyped_storage().data_ptr() for t in _tensors_in(roots)}
    tracker = _AllocationTracker(existing)
    with tracker:
        fn()
    return tracker.peak, "live torch storages (dispatch mode)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------------------
# settings


def _block_params(device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in BLOCK_1B_SHAPES.values():
        p = torch.nn.Parameter((0.02 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype))
        p.grad = (1e-3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
        params.append(p)
    return params


def _block_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == REFERENCE:
        return torch.optim.AdamW(params, lr=lr, foreach=True)
    spec = OPTIMIZERS[name]
    hp = dict(spec.defaults)
    return CombinedOptimizer(spec.builder(params, [], lr, hp))


def _micro_model(device: torch.device, dtype: torch.dtype, vocab: int = 4096, batch: int = 4, seq: int = 128):
    model = build_model("micro", vocab, seed=0, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    model(input_ids=x, labels=x).loss.backward()
    return model


def bench_optimizers(setting: str, device: torch.device, dtype: torch.dtype, args, log) -> list[BenchRow]:
    """One row per optimizer on the 1b block or the micro model, plus the AdamW(foreach) reference."""
    rows, ref_ms = [], None
    threads = torch.get_num_threads()
    lr = 1e-6  # tiny steps: repeated updates with one fixed gradient stay harmless
    model = _micro_model(device, dtype) if setting == "micro" else None
    if model is None:
        params = _block_params(device, dtype)
        hidden = params
    else:
        params = list(model.parameters())
        hidden = [p for _, p in split_parameters(model)[0]]

    def row(name, ms, repeats, state, hidden_state, peak, method, note):
        ratio = ms / ref_ms if ref_ms and not math.isnan(ms) else None
        return BenchRow(setting, name, _device_label(device), _dtype(dtype), threads, ms, repeats, ratio, REFERENCE, state,
                        hidden_state, peak, method, note)

    for name in [REFERENCE] + list(OPTIMIZERS):
        slow = setting == "block-1b" and device.type == "cpu" and name in SLOW_ON_CPU
        if slow and args.quick:
            rows.append(row(name, math.nan, 0, None, None, None, "", "skipped (--quick)"))
            continue
        if name == REFERENCE:
            opt = torch.optim.AdamW(params, lr=lr, foreach=True)
        elif model is None:
            opt = _block_optimizer(name, params, lr)
        else:
            opt = build_optimizer(model, name, lr)
        warmup = 2 if name in PROJECTOR_WARMUP else 1
        repeats = 1 if slow else args.repeats
        t0 = time.perf_counter()
        try:
            ms = 1e3 * time_calls(opt.step, device, warmup, repeats)
            roots = [params, [p.grad for p in params], opt.state]
            peak, method = peak_extra_bytes(opt.step, roots, device)
        except Exception as exc:  # a third-party optimizer failing must not hide the others' results
            log(f"  {setting:9s} {name:13s} FAILED: {type(exc).__name__}: {exc}")
            rows.append(row(name, math.nan, 0, None, None, None, "", f"failed: {type(exc).__name__}: {exc}"))
            opt = None
            continue
        if name == REFERENCE:
            ref_ms = ms
        notes = ["first step (SVD projectors) excluded"] if name in PROJECTOR_WARMUP else []
        notes += ["1 timed step"] if slow else []
        rows.append(row(name, ms, repeats, optimizer_state_bytes(opt), optimizer_state_bytes(opt, hidden), peak,
                        method, "; ".join(notes)))
        log(f"  {setting:9s} {name:13s} {ms:10.1f} ms  ({time.perf_counter() - t0:.0f} s wall)")
        del opt
        gc.collect()
    return rows


def bench_kernels(device: torch.device, dtype: torch.dtype, args, log) -> list[BenchRow]:
    """Fast vs literal SR-Sinkhorn over the 1b block's seven matrices; Newton-Schulz vs SVD whitening over
    its q and down matrices (one square, one wide: whitening a 2048-side Gram is expensive on CPU)."""
    g = torch.Generator().manual_seed(1)
    grads = {k: torch.randn(shape, generator=g).to(device=device, dtype=dtype) for k, shape in BLOCK_1B_SHAPES.items()}
    block, pair = list(grads.values()), [grads["q_proj"], grads["down_proj"]]
    if args.quick:
        block = pair
    threads = torch.get_num_threads()
    cases = [
        ("sr-sinkhorn-alternating", lambda: [sr_sinkhorn_naive(G, 5) for G in block], None, block),
        ("sr-sinkhorn-fast", lambda: [sr_sinkhorn(G, 5) for G in block], "sr-sinkhorn-alternating", block),
        ("whiten-svd", lambda: [whiten(G, method="exact") for G in pair], None, pair),
        ("whiten-newton-schulz", lambda: [whiten(G, steps=10, beta=0.8) for G in pair], "whiten-svd", pair),
    ]
    rows, ms_of = [], {}
    for name, fn, base, mats in cases:
        expensive = name.startswith("whiten") and device.type == "cpu"
        repeats = 1 if expensive else args.repeats
        ms = 1e3 * time_calls(fn, device, 0 if expensive else 1, repeats)
        peak, method = peak_extra_bytes(fn, mats, device)
        ms_of[name] = ms
        scope = "q, down" if mats is pair else "q, k, v, o, gate, up, down"
        rows.append(BenchRow("kernel", name, _device_label(device), _dtype(dtype), threads, ms, repeats,
                             ms / ms_of[base] if base else None, base or "", None, None, peak, method,
                             f"sum over 1b {scope}; L=5" if "sinkhorn" in name else f"sum over 1b {scope}; k=10, beta=0.8"))
        log(f"  kernel    {name:24s} {ms:10.1f} ms")
    return rows


def _device_label(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------------------------
# report


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(rows: list[BenchRow]) -> str:
    header = f"{'setting':9s} {'method':24s} {'device':6s} {'dtype':8s} {'step ms':>10s} {'ratio':>7s} " \
             f"{'state':>10s} {'hidden st.':>10s} {'peak extra':>10s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ms = "skipped" if math.isnan(r.median_ms) else f"{r.median_ms:.1f}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"{r.setting:9s} {r.method:24s} {r.device:6s} {r.dtype:8s} {ms:>10s} {ratio:>7s} "
                     f"{_fmt_bytes(r.state_bytes):>10s} {_fmt_bytes(r.hidden_state_bytes):>10s} "
                     f"{_fmt_bytes(r.peak_extra_bytes):>10s}")
    return "\n".join(lines)


def check_targets(rows: list[BenchRow]) -> list[dict[str, str]]:
    """The performance targets: {target, measured, status} with status 'met' / 'NOT met' / 'not measured'."""

    def find(setting, method, device="cpu", dtype="float32"):
        return next((r for r in rows if (r.setting, r.method, r.device, r.dtype) == (setting, method, device, dtype)
                     and not math.isnan(r.median_ms)), None)

    def target(name, measured, ok):
        return {"target": name, "measured": measured, "status": "not measured" if ok is None else ("met" if ok else "NOT met")}

    out = []
    sink = find("block-1b", "sinkgd")
    ratio = sink.ratio if sink else None
    out.append(target("SinkGD step <= 1.0x AdamW(foreach) step on the 1b block (CPU fp32)",
                      f"{ratio:.2f}x" if ratio is not None else "", None if ratio is None else ratio <= 1.0))
    fast, lit = find("kernel", "sr-sinkhorn-fast"), find("kernel", "sr-sinkhorn-alternating")
    speedup = lit.median_ms / fast.median_ms if fast and lit else None
    out.append(target("fast SR-Sinkhorn >= 4x faster than the literal alternating form",
                      f"{speedup:.1f}x" if speedup is not None else "", None if speedup is None else speedup >= 4.0))
    for method in ("sinkgd", "swan", "swan-nsds"):
        found = [r for r in rows if r.method == method and r.hidden_state_bytes is not None]
        worst = max((r.hidden_state_bytes for r in found), default=None)
        out.append(target(f"zero optimizer-state bytes for hidden matrices under {method}",
                          f"{worst} B over {len(found)} setting(s)" if found else "", None if worst is None else worst == 0))
    return out


def environment() -> dict[str, str]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["tf32_matmul"] = str(torch.backends.cuda.matmul.allow_tf32)
    return env


def write_csv(rows: list[BenchRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for r in rows:
            d = asdict(r)
            d["median_ms"] = "" if math.isnan(r.median_ms) else f"{r.median_ms:.3f}"
            d["ratio"] = "" if r.ratio is None else f"{r.ratio:.4f}"
            writer.writerow(d)


def read_csv(path: Path) -> list[BenchRow]:
    """The rows of an `optimizer_step.csv` written by `write_csv`."""
    def num(text, kind):
        return None if text == "" else kind(text)

    with open(path, newline="") as f:
        return [BenchRow(setting=d["setting"], method=d["method"], device=d["device"], dtype=d["dtype"],
                         threads=int(d["threads"]), median_ms=float(d["median_ms"] or "nan"),
                         repeats=int(d["repeats"]), ratio=num(d["ratio"], float), baseline=d["baseline"],
                         state_bytes=num(d["state_bytes"], int), hidden_state_bytes=num(d["hidden_state_bytes"], int),
                         peak_extra_bytes=num(d["peak_extra_bytes"], int), memory_method=d["memory_method"],
                         note=d["note"]) for d in csv.DictReader(f)]


def write_targets(rows: list[BenchRow], out_dir: Path) -> list[dict[str, str]]:
    """Evaluate the targets on `rows`, write `<out_dir>/targets.csv`, print them, return them."""
    targets = check_targets(rows)
    with (Path(out_dir) / "targets.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["target", "measured", "status"])
        writer.writeheader()
        writer.writerows(targets)
    print("targets:")
    for t in targets:
        print(f"  {t['target']}: {t['measured'] or '-'} -> {t['status']}")
    return targets


# ------------------------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m multinorm.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bench", help="output directory (default: results/bench)")
    parser.add_argument("--quick", action="store_true",
                        help="skip the CPU-expensive block methods (swan, muon, galore, fira); kernels on q, down only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the steps are memory bound, and one thread gives "
                             "steady timings on a small shared machine)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per cheap method (default 5)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU, plus CUDA (bf16 and fp32) when available")
    parser.add_argument("--targets-only", action="store_true",
                        help="re-evaluate the targets from <out>/optimizer_step.csv without benchmarking")
    parser.add_argument("--settings", default="block-1b,micro,kernel",
                        help="comma-separated subset of block-1b, micro, kernel")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[BenchRow]:
    args = parse_args(argv)
    if args.targets_only:
        path = Path(args.out) / "optimizer_step.csv"
        if not path.exists():
            raise SystemExit(f"--targets-only: no {path}; run the benchmark first")
        rows = read_csv(path)
        write_targets(rows, Path(args.out))
        return rows
    torch.set_num_threads(args.threads)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = set(settings) - {"block-1b", "micro", "kernel"}
    if unknown:
        raise SystemExit(f"unknown settings: {', '.join(sorted(unknown))}")
    runs: list[tuple[torch.device, torch.dtype]] = []
    if args.device in ("auto", "cpu"):
        runs.append((torch.device("cpu"), torch.float32))
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        runs += [(torch.device("cuda"), torch.float32), (torch.device("cuda"), torch.bfloat16)]
    elif args.device == "cuda":
        raise SystemExit("--device cuda: no CUDA device available")

    def log(msg: str) -> None:
        print(msg, flush=True)

    env = environment()
    log("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    assert MODEL_CONFIGS["1b"].hidden_size == 2048 and MODEL_CONFIGS["1b"].intermediate_size == 5461
    rows: list[BenchRow] = []
    started = time.perf_counter()
    for device, dtype in runs:
        log(f"== {device} {_dtype(dtype)}")
        if "block-1b" in settings:
            rows += bench_optimizers("block-1b", device, dtype, args, log)
        if "micro" in settings:
            rows += bench_optimizers("micro", device, dtype, args, log)
        if "kernel" in settings:
            rows += bench_kernels(device, dtype, args, log)
    out = Path(args.out) / "optimizer_step.csv"
    write_csv(rows, out)
    print()
    print(format_table(rows))
    print()
    print(f"ratio: step time / torch.optim.AdamW(foreach=True) step on the same parameters (kernels: / their "
          f"reference); threads={torch.get_num_threads()}; peak extra: "
          + ", ".join(sorted({r.memory_method for r in rows if r.memory_method})))
    (Path(args.out) / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    write_targets(rows, Path(args.out))
    print(f"wrote {out} ({len(rows)} rows) in {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
