"""Measurement primitives: interleaved timing, host-sync counting, transient memory, machine rates.

Timing uses ``torch.utils.benchmark.Timer.blocked_autorange``, which warms the statement up, runs it in
blocks for at least ``min_run_time`` seconds and synchronizes CUDA around each block; the median time per
call of one such measurement is one *round's* time. Comparisons run their callables in alternation,
A B A B ..., so slow drifts of a shared machine (other jobs, clock changes) hit both sides of a ratio
alike, and each ratio is taken within one round.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import psutil
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark

__all__ = ["interleave", "ratio_summary", "HostSyncCounter", "count_host_syncs", "peak_extra_bytes",
           "memory_bandwidth", "last_level_cache_bytes", "matmul_callable", "environment", "available_cores",
           "threading_label"]


# ------------------------------------------------------------------------------------------------------------
# timing


def interleave(fns: Mapping[str, Callable[[], object]], rounds: int, min_run_time: float) -> pd.DataFrame:
    """Time every callable once per round, in the order given, for ``rounds`` rounds.

    Returns one row per (round, name): ``seconds`` (median per call of one ``blocked_autorange``) and
    ``calls`` (timed calls behind it; each measurement also makes at least one untimed warm-up call).
    """
    threads = torch.get_num_threads()  # Timer would otherwise pin its statement to one thread
    timers = {name: benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads, label=name)
              for name, fn in fns.items()}
    rows = []
    for r in range(rounds):
        for name, timer in timers.items():
            m = timer.blocked_autorange(min_run_time=min_run_time)
            rows.append({"round": r, "name": name, "seconds": m.median, "calls": m.number_per_run * len(m.times)})
    return pd.DataFrame(rows, columns=["round", "name", "seconds", "calls"])


def ratio_summary(times: pd.DataFrame, num: str, den: str, scale: float = 1.0) -> dict[str, float]:
    """Median, min and max over rounds of ``scale * seconds[num] / seconds[den]``, each ratio taken within
    one round of :func:`interleave`."""
    wide = times.pivot(index="round", columns="name", values="seconds")
    ratio = scale * wide[num] / wide[den]
    return {"ratio": float(ratio.median()), "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max())}


# ------------------------------------------------------------------------------------------------------------
# host syncs and transient memory


class HostSyncCounter:
    """Counts ``aten::_local_scalar_dense`` calls under this context manager: the op behind ``.item()``,
    ``bool(t)``, ``int(t)`` and ``float(t)`` on a tensor, and inside ops that read a value on the host, each
    of which makes the host wait for the device. (Device-to-host copies such as ``t.cpu()`` also wait, but
    are other ops and are not counted.) The ops are read from ``torch.profiler``'s record of the block, so
    a call made inside another op is seen too; counts add up over several ``with`` blocks. ``sources``
    counts them by the op that made the call (``aten::item`` is skipped: the op above it is named)."""

    SYNC_OP = "aten::_local_scalar_dense"

    def __init__(self):
        self.count = 0
        self.sources: Counter[str] = Counter()
        self._profiler: profile | None = None

    def __enter__(self) -> HostSyncCounter:
        self._profiler = profile(activities=[ProfilerActivity.CPU])
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        prof, self._profiler = self._profiler, None
        prof.__exit__(*exc)
        for event in prof.events():
            if event.name == self.SYNC_OP:
                parent = event.cpu_parent
                while parent is not None and parent.name == "aten::item":
                    parent = parent.cpu_parent
                self.count += 1
                self.sources[parent.name if parent is not None else "(top level)"] += 1


def count_host_syncs(fn: Callable[[], object]) -> int:
    """Host syncs (see :class:`HostSyncCounter`) during one call of ``fn``."""
    with HostSyncCounter() as counter:
        fn()
    return counter.count


def _tensor_leaves(obj) -> list[torch.Tensor]:
    """The tensors in a torch function's result (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensor_leaves(item)]
    return []


class _AllocationTracker(TorchFunctionMode):
    """Peak bytes of tensor storages created under this mode and alive at the same time.

    The result of every torch function and tensor method called under the mode is inspected; a storage
    not among ``existing`` (parameters, gradients, optimizer state) is new and counted until it is freed
    (checked through weak references before each call). Not seen: buffers that one torch call allocates
    and frees inside itself, and scratch memory that libraries allocate outside torch tensors
    (LAPACK/BLAS workspaces, numba arrays).
    """

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing = existing
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        out = func(*args, **(kwargs or {}))
        for t in _tensor_leaves(out):
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
    """Peak memory that one call of ``fn`` allocates on top of what exists, and how it was measured.

    On CPU a torch function mode tracks the storages that the call's torch operations return until they
    are freed (torch exposes no CPU allocator statistics, and the process RSS misses buffers that malloc
    recycles); tensors reachable
    from ``roots`` already exist and are not counted. On CUDA it is ``max_memory_allocated`` over the call
    minus ``memory_allocated`` before it.
    """
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
    return tracker.peak, "live torch storages (torch function mode)"


# ------------------------------------------------------------------------------------------------------------
# machine rates


def memory_bandwidth(device: torch.device, nbytes: int, threads: int, min_run_time: float) -> dict[str, float]:
    """Sustained memory bandwidth in bytes/s over ``nbytes`` float32 tensors, with ``threads`` torch threads,
    of three streams: ``read`` (a sum; nbytes moved), ``copy`` (into a second tensor; 2 nbytes) and
    ``axpy`` (``y += a x`` in place: two reads and a write, 3 nbytes; the access pattern of an SGD step).
    The tensors should be much larger than the last-level cache. One core's bandwidth is bounded by the
    cache misses it keeps in flight, so a fused kernel over more streams can beat all three."""
    x = torch.ones(nbytes // 4, device=device)
    y = torch.ones_like(x)
    out = {}
    for kind, stmt, moved in (("read", "x.sum()", nbytes), ("copy", "y.copy_(x)", 2 * nbytes),
                              ("axpy", "y.add_(x, alpha=0.5)", 3 * nbytes)):
        timer = benchmark.Timer(stmt, globals={"x": x, "y": y}, num_threads=threads)
        out[kind] = moved / timer.blocked_autorange(min_run_time=min_run_time).median
    return out


def last_level_cache_bytes(device: torch.device) -> int | None:
    """The largest cache a step's repeated reads of one matrix could be served from: the highest CPU cache
    level in sysfs (Linux) or a GPU's L2; None where the system does not say."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or None
    best = None
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = _cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if size and (best is None or level > best[0] or (level == best[0] and size > best[1])):
            best = (level, size)
    return best[1] if best else None


def _cache_size(text: str) -> int:
    """sysfs cache size ("32768K", "1M", "512") in bytes."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def matmul_callable(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], float]:
    """A square ``n x n`` matmul into a preallocated output, and its FLOPs (2 n^3)."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=c)), 2.0 * n**3


# ------------------------------------------------------------------------------------------------------------
# environment


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threading_label(threads: int) -> str:
    """How a row was threaded, in words the targets select on: "1 thread", "all cores" (a training run's
    default: torch uses every available core) or "N threads"."""
    if threads == 1:
        return "1 thread"
    return "all cores" if threads == available_cores() else f"{threads} threads"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_setting(config: str, key: str) -> str | None:
    """A ``KEY=value`` entry of ``torch.__config__.show()`` (e.g. BLAS_INFO)."""
    found = re.search(rf"\b{key}=([^,\s]+)", config)
    return found.group(1) if found else None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment(argv: list[str] | None = None) -> dict:
    """Where and with what the benchmark ran (``argv``: its arguments): CPU, cores, threads, versions,
    BLAS, GPU, load, date."""
    config = torch.__config__.show()
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m multinorm.bench", *(sys.argv[1:] if argv is None else argv)]),
        "git_commit": _git_commit(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "available_cores": available_cores(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "blas": _build_setting(config, "BLAS_INFO"),
        "lapack": _build_setting(config, "LAPACK_INFO"),
        "torch_config": config.strip().splitlines(),
        "parallel_info": torch.__config__.parallel_info().strip().splitlines(),
        "gpu": None,
        "last_level_cache_bytes": last_level_cache_bytes(torch.device("cpu")),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return env


def dump_json(obj: dict) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"
