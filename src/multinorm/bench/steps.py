"""Optimizer-step benchmark: time, ratio to AdamW, state, transient memory, host syncs, compute and
bandwidth floors of ``optimizer.step()`` over a fixed set of hidden matrices.

Settings (all parameters trainable, gradients fixed, every method built fresh through the registry
builder ``OPTIMIZERS[name].builder(matrices, [], lr, defaults)``, i.e. with no AdamW group):

* ``block-1b``: one LLaMA-1B block's seven hidden matrices -- q, k, v, o 2048 x 2048; gate, up 5461 x 2048;
  down 2048 x 5461 -- with random weights and gradients;
* ``micro``: the hidden matrices of the ``micro`` LLaMA (vocabulary 4096), gradients from one
  forward/backward on random tokens;
* ``hidden-350m``, ``hidden-1b`` (CUDA only): every hidden matrix of the 350M / 1B model (shapes from a
  ``meta``-device model), random weights and gradients.

The reference is ``torch.optim.AdamW(fused=True)``, the fastest AdamW torch has on CPU and CUDA, over the
same matrices; each method is timed in alternation with it (see :mod:`multinorm.bench.measure`).
``AdamW(foreach=True)`` (torch's multi-tensor path) is timed as a secondary row.

Floors. SWAN is compute bound: its floor is the matmul FLOPs of its whitening (:func:`swan_flops`) at the
fp32 matmul rate of this machine, measured in the same rounds on a square matmul of the matrices'
median smaller side. AdamW, SGD and SinkGD are memory bound: their floor is the bytes a step must move
(:func:`traffic`) at the memory bandwidth measured at the same thread count
(:func:`multinorm.bench.measure.memory_bandwidth`, :func:`bandwidth_floor`): passes that only read (SinkGD's
gradient reads) at the ``read`` stream's rate, every other pass at the best stream's. On one core a
read-only stream is the slower one (fewer misses in flight without writes), so the floor of a step that
mostly reads is higher than its bytes at the best stream. ``fraction`` is the floor's share of the step
(achieved over floor bandwidth); it can exceed 1 when a step's kernels keep more streams in flight than
the simple streams do, so the floor is an estimate, not a strict bound. ``bound_ms`` is the floor less the
reads a last-level cache could serve (the repeated reads of every gradient that fits in it, counted as
free): the lower estimate, which the targets compare with their thresholds (a step ratio target whose
threshold is below SinkGD's ``bound_ms`` over AdamW's step is out of reach on the machine).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pandas as pd
import torch

from ..llama import MODEL_CONFIGS, build_model, split_parameters
from ..optim import OPTIMIZERS, CombinedOptimizer, SinkGD, optimizer_state_bytes
from .measure import (HostSyncCounter, interleave, last_level_cache_bytes, matmul_callable, peak_extra_bytes,
                      ratio_summary, threading_label)

__all__ = ["BLOCK_1B_SHAPES", "SETTINGS", "GPU_SETTINGS", "reference", "method_names", "setting_shapes",
           "random_params", "make_params", "make_optimizer", "predicted_step", "swan_flops", "COMPUTE_FLOORS",
           "Traffic", "traffic", "bandwidth_floor", "bench_setting", "unmeasured_rows", "STEP_COLUMNS", "FLOOR_COLUMNS", "BANDWIDTH_COLUMNS"]

BLOCK_1B_SHAPES = {
    "q_proj": (2048, 2048), "k_proj": (2048, 2048), "v_proj": (2048, 2048), "o_proj": (2048, 2048),
    "gate_proj": (5461, 2048), "up_proj": (5461, 2048), "down_proj": (2048, 5461),
}
SETTINGS = ("block-1b", "micro", "hidden-350m", "hidden-1b")
GPU_SETTINGS = ("hidden-350m", "hidden-1b")  # on a CPU: minutes per step and tens of GB
QUICK_SHRINK = 16  # --quick divides the shapes of the random settings by this
PROBE_SHRINK = 8  # shapes of the step that predicts a method's step time
ADAMW_VARIANTS = {"adamw-foreach": {"foreach": True}, "adamw-fused": {"fused": True}}
COMPILED = ("adamw-foreach", "sinkgd")  # CUDA only: also timed as a torch.compile'd step
# CPU only: SinkGD with torch operations (fused=False), the path it takes on other devices and when compiled
UNFUSED = "sinkgd-torch"
PROJECTOR_WARMUP = {"galore", "fira"}  # their first step computes SVD projectors, reused for 200 steps
LR = 1e-6  # tiny steps: repeated updates with one fixed gradient stay harmless

_WHERE = ["setting", "device", "dtype", "threads", "threading", "matrices", "params", "method"]
STEP_COLUMNS = _WHERE + ["baseline", "rounds", "step_ms", "step_ms_min", "step_ms_max", "baseline_ms", "ratio",
                         "ratio_min", "ratio_max", "state_bytes", "peak_extra_bytes", "host_syncs", "memory_method",
                         "note"]
FLOOR_COLUMNS = _WHERE + ["rounds", "gflop", "matmul_n", "matmul_gflops", "floor_ms", "step_ms", "ratio", "ratio_min",
                          "ratio_max"]
BANDWIDTH_COLUMNS = _WHERE + ["accounting", "bytes", "step_ms", "achieved_gbs", "machine_gbs", "machine_stream",
                              "fraction", "floor_ms", "bound_ms"]


def reference(device: torch.device) -> str:
    """The AdamW every method is compared with: the fastest torch has, its fused kernel (CPU and CUDA)."""
    return "adamw-fused"


def method_names(device: torch.device, compile_steps: bool = False) -> list[str]:
    """The reference, the other AdamW variant, every registry optimizer (and compiled steps on CUDA)."""
    ref = reference(device)
    names = [ref] + [n for n in ADAMW_VARIANTS if n != ref] + list(OPTIMIZERS)
    if device.type == "cpu":
        names.append(UNFUSED)
    if compile_steps and device.type == "cuda":
        names += [f"{n}+compile" for n in COMPILED]
    return names


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------------
# parameters and optimizers


def setting_shapes(setting: str, quick: bool = False) -> list[tuple[int, int]]:
    """Matrix shapes of a setting built from random tensors (block-1b, hidden-350m, hidden-1b)."""
    if setting == "block-1b":
        shapes = list(BLOCK_1B_SHAPES.values())
    elif setting in GPU_SETTINGS:
        model = build_model(setting.removeprefix("hidden-"), device="meta")
        shapes = [tuple(p.shape) for _, p in split_parameters(model)[0]]
    else:
        raise ValueError(f"no fixed shapes for setting {setting!r}")
    shrink = QUICK_SHRINK if quick else 1
    return [(m // shrink, n // shrink) for m, n in shapes]


def random_params(shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype,
                  seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters of the given shapes with random weights and ``.grad``."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(0.02 * torch.randn(shape, generator=g, device=device, dtype=dtype))
        p.grad = 1e-3 * torch.randn(shape, generator=g, device=device, dtype=dtype)
        params.append(p)
    return params


def make_params(setting: str, device: torch.device, dtype: torch.dtype,
                quick: bool = False) -> list[torch.nn.Parameter]:
    """The setting's matrices as parameters with ``.grad`` set (see the module docstring). With ``quick``,
    random shapes are divided by QUICK_SHRINK and ``micro`` takes the ``nano`` model's matrices."""
    if setting == "micro":
        model = build_model("nano" if quick else "micro", 4096, seed=0, device=device, dtype=dtype)
        batch, seq = (2, 32) if quick else (4, 128)
        tokens = torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
        model(input_ids=tokens, labels=tokens).loss.backward()
        return [p for _, p in split_parameters(model)[0]]
    return random_params(setting_shapes(setting, quick), device, dtype)


def make_optimizer(name: str, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """An AdamW variant, or a registry optimizer over ``params`` alone (all treated as hidden matrices)."""
    if name in ADAMW_VARIANTS:
        return torch.optim.AdamW(list(params), lr=LR, **ADAMW_VARIANTS[name])
    if name == UNFUSED:
        hp = OPTIMIZERS["sinkgd"].defaults
        return CombinedOptimizer([SinkGD(list(params), lr=LR, iters=hp["iters"], eps=hp["eps"], fused=False)])
    spec = OPTIMIZERS[name]
    return CombinedOptimizer(spec.builder(list(params), [], LR, dict(spec.defaults)))


def _compiled_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
    @torch.compile(fullgraph=False)
    def step():
        opt.step()
    return step


# ------------------------------------------------------------------------------------------------------------
# floors


def swan_flops(shapes: Sequence[tuple[int, int]], ns_steps: int) -> float:
    """Matmul FLOPs of SWAN's whitening per step. For each m x n gradient, with s = min(m, n) and
    l = max(m, n): the Gram matrix (2 s^2 l), ``ns_steps`` coupled Newton-Schulz steps of three s x s
    products (6 s^3 each) and the whitened product (2 s^2 l). Element-wise work (GradNorm, rescaling) is
    left out, so the floor is a lower bound."""
    total = 0.0
    for m, n in shapes:
        s, l = min(m, n), max(m, n)
        total += 4.0 * s * s * l + 6.0 * ns_steps * s**3
    return total


# method -> FLOPs of one step over the given shapes (compared with the measured matmul rate)
COMPUTE_FLOORS: dict[str, Callable[[Sequence[tuple[int, int]]], float]] = {
    "swan": lambda shapes: swan_flops(shapes, OPTIMIZERS["swan"].defaults["ns_steps"]),
}


class Traffic(NamedTuple):
    """The bytes a step moves (``bytes``), the accounting in words, how many of them are passes that only
    read (``read_only``: SinkGD's gradient reads; a core streams those more slowly than read-and-write
    passes, whose writes keep more misses in flight), and how many of those reads a last-level cache could
    serve (``cacheable``: the repeated reads of each matrix that fits in it)."""

    bytes: int
    accounting: str
    read_only: int = 0
    cacheable: int = 0

    def from_memory(self) -> "Traffic":
        """The bytes no cache can spare: these, less the ``cacheable`` reads."""
        return Traffic(self.bytes - self.cacheable, self.accounting, self.read_only - self.cacheable, 0)


def traffic(method: str, params: Sequence[torch.Tensor], cache_bytes: int | None = None) -> Traffic | None:
    """Bytes that a step of ``method`` moves through memory, and the accounting; None for a method without
    one. AdamW (any variant) and SGD stream their tensors once; SinkGD reads the gradient once per Sinkhorn
    iteration (each row gives its factor and then, still cached, its share of the column sums; the exact
    prescale follows from iteration 0's row sums) and once more with the weight for the update: what its
    fused CPU loop (``multinorm.optim.sinkgd_cpu``) moves. Of a gradient no larger than ``cache_bytes``
    (the last-level cache), the reads after the first are ``cacheable``: a loop that sweeps one matrix at
    a time can find it there."""
    base = method.removesuffix("+compile")
    kind = "adamw" if base in ADAMW_VARIANTS or base == "adamw" else base
    if kind not in ("adamw", "sgd", "sinkgd"):
        return None
    iters = OPTIMIZERS["sinkgd"].defaults["iters"]
    total = reads = cached = 0
    for p in params:
        w = p.element_size()
        g = p.grad.element_size() if p.grad is not None else w
        per = {"adamw": 2 * w + g + 2 * w + 2 * w,  # torch keeps AdamW's moments in the parameter's dtype
               "sgd": g + 2 * w,
               "sinkgd": iters * g + (g + 2 * w)}[kind]
        total += per * p.numel()
        reads += (iters * g if kind == "sinkgd" else 0) * p.numel()
        if kind == "sinkgd" and cache_bytes and g * p.numel() <= cache_bytes:
            cached += (iters - 1) * g * p.numel()
    text = {"adamw": "7 passes: param r+w, grad r, exp_avg r+w, exp_avg_sq r+w",
            "sgd": "3 passes: grad r, param r+w",
            "sinkgd": f"{iters} grad reads (L={iters}: one per Sinkhorn iteration); "
                      "grad r + param r+w (update applied in place)"}[kind]
    return Traffic(total, text, reads, cached)


def bandwidth_floor(moved: Traffic, machine_bandwidth: dict[str, float]) -> tuple[float, str]:
    """Seconds the bytes of ``moved`` take at least, and the streams used: its read-only passes at the
    machine's ``read`` bandwidth, the rest at its best stream (a step that only reads cannot stream faster
    than a sum does)."""
    stream, best = max(machine_bandwidth.items(), key=lambda kv: kv[1])
    if not moved.read_only or "read" not in machine_bandwidth:
        return moved.bytes / best, stream
    seconds = moved.read_only / machine_bandwidth["read"] + (moved.bytes - moved.read_only) / best
    return seconds, f"read (read-only passes), {stream} (the rest)"


# ------------------------------------------------------------------------------------------------------------
# one setting


def _stats(times: pd.DataFrame, name: str) -> dict[str, float]:
    s = times.loc[times["name"] == name, "seconds"] * 1e3
    return {"median": float(s.median()), "min": float(s.min()), "max": float(s.max())}


def _timed_step(step: Callable[[], object], device: torch.device, warmup: int) -> float:
    """Seconds of the last of ``warmup`` calls (a plain clock: this only sizes the measurement)."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        step()
        _sync(device)
        elapsed = time.perf_counter() - t0
    return elapsed


def predicted_step(name: str, shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> float:
    """An upper estimate of one step's seconds: a step on every shape divided by PROBE_SHRINK, times
    PROBE_SHRINK^3 (the cost of a matmul-bound step; memory-bound steps grow only as the square)."""
    small = [(max(m // PROBE_SHRINK, 8), max(n // PROBE_SHRINK, 8)) for m, n in shapes]
    opt = make_optimizer(name, random_params(small, device, dtype))
    return PROBE_SHRINK**3 * _timed_step(opt.step, device, 3 if name in PROJECTOR_WARMUP else 2)


def bench_setting(setting: str, device: torch.device, dtype: torch.dtype, methods: Sequence[str], args,
                  machine_bandwidth: dict[str, float] | None, log) -> dict[str, list]:
    """Benchmark every method on one setting. Returns lists of rows for optimizer_step.csv,
    compute_floor.csv and bandwidth.csv, and the raw per-round times (DataFrames) under "raw".

    Per method: a step on shapes shrunk by PROBE_SHRINK predicts the step time, and a method predicted
    over 10 x ``args.max_step`` seconds is skipped (e.g. bf16 Newton-Schulz on a CPU without bf16 units);
    then warm-up step(s); one untimed step under the memory tracker and the host-sync counter; then
    ``args.rounds`` interleaved rounds with the reference (``args.slow_rounds`` when the warm-up step took
    over ``args.slow_step`` seconds), plus a square matmul for methods with a compute floor. A method
    whose warm-up step took over ``args.max_step`` is timed by that step alone, in one round with the
    reference and the matmul measured right after it (SWAN on the 1b block on most CPUs).
    """
    params = make_params(setting, device, dtype, args.quick)
    common = {"setting": setting, "device": device.type, "dtype": _dtype_name(dtype),
              "threads": torch.get_num_threads(), "threading": threading_label(torch.get_num_threads()),
              "matrices": len(params), "params": sum(p.numel() for p in params)}
    ref = reference(device)
    ref_opt = make_optimizer(ref, params)
    ref_opt.step()  # creates its state
    out: dict[str, list] = {"optimizer_step": [], "compute_floor": [], "bandwidth": [], "raw": []}
    for name in methods:
        t_start = time.perf_counter()
        try:
            rows = _bench_method(name, ref, ref_opt, params, device, dtype, args, machine_bandwidth)
        except Exception as exc:  # one failing method (e.g. a third-party package) must not hide the others
            log(f"  {setting:11s} {name:20s} FAILED: {type(exc).__name__}: {exc}")
            rows = {"optimizer_step": [{"method": name, "baseline": ref,
                                        "note": f"failed: {type(exc).__name__}: {exc}"}]}
        for key, part in rows.items():
            out[key] += [r.assign(**common) if key == "raw" else {**common, **r} for r in part]
        row = rows["optimizer_step"][0]
        if "ratio" in row:
            log(f"  {setting:11s} {name:20s} {row['step_ms']:10.2f} ms  x{row['ratio']:.3f} "
                f"[{row['ratio_min']:.3f}, {row['ratio_max']:.3f}] of {ref}, {row['rounds']} rounds "
                f"({time.perf_counter() - t_start:.0f} s)")
        elif not row["note"].startswith("failed"):
            log(f"  {setting:11s} {name:20s} {row['note']}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _bench_method(name: str, ref: str, ref_opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                  device: torch.device, dtype: torch.dtype, args, machine_bandwidth) -> dict[str, list]:
    base = name.removesuffix("+compile")
    compiled = name != base
    shapes = [tuple(p.shape) for p in params]
    notes = []
    if name != ref and not compiled:
        predicted = predicted_step(base, shapes, device, dtype)
        if predicted > 10 * args.max_step:
            note = (f"skipped: a step on shapes / {PROBE_SHRINK} predicts up to {predicted:.0f} s "
                    f"(over 10 x --max-step {args.max_step:g})")
            return {"optimizer_step": [{"method": name, "baseline": ref, "note": note}]}
    opt = ref_opt if name == ref else make_optimizer(base, params)
    step = _compiled_step(opt) if compiled else opt.step
    # galore/fira: the first step computes SVD projectors; compiled steps: the first call compiles
    warm = _timed_step(step, device, 2 if base in PROJECTOR_WARMUP or compiled else 1)
    if base in PROJECTOR_WARMUP:
        notes.append("first step (SVD projectors) excluded")
    one_step = warm > args.max_step and name != ref
    peak = syncs = None
    memory_method = ""
    if one_step:
        notes.append(f"one round: the method's time is its warm-up step ({warm:.0f} s, over --max-step "
                     f"{args.max_step:g}); memory and syncs not probed")
    elif compiled:
        notes.append("torch.compile'd step; memory and syncs not probed")
    else:
        with HostSyncCounter() as counter:
            peak, memory_method = peak_extra_bytes(step, [params, [p.grad for p in params], opt.state], device)
        syncs = counter.count
    rounds = 1 if one_step else args.rounds
    if warm > args.slow_step and not one_step:
        rounds = args.slow_rounds
        notes.append(f"{rounds} rounds (step over {args.slow_step:g} s)")
    fns = {ref: ref_opt.step} | ({name: step} if name != ref and not one_step else {})
    floor_flops = COMPUTE_FLOORS.get(name)
    if floor_flops is not None:
        matmul_n = int(statistics.median(min(s) for s in shapes))
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        fns["matmul"], mm_flops = matmul_callable(matmul_n, device, compute_dtype)
    times = interleave(fns, rounds, args.min_run_time)
    if one_step:  # the reference (and matmul) measured right after the method's single step
        times = pd.concat([times, pd.DataFrame([{"round": 0, "name": name, "seconds": warm, "calls": 1}])],
                          ignore_index=True)

    mine, theirs = _stats(times, name), _stats(times, ref)
    ratio = ratio_summary(times, name, ref) if name != ref else {"ratio": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}
    out = {"raw": [times.assign(comparison=name)], "compute_floor": [], "bandwidth": []}
    out["optimizer_step"] = [{
        "method": name, "baseline": ref, "rounds": rounds,
        "step_ms": mine["median"], "step_ms_min": mine["min"], "step_ms_max": mine["max"],
        "baseline_ms": theirs["median"], **ratio, "state_bytes": optimizer_state_bytes(opt),
        "peak_extra_bytes": peak, "host_syncs": syncs, "memory_method": memory_method, "note": "; ".join(notes)}]
    if floor_flops is not None:
        flops = floor_flops(shapes)
        rate = float((mm_flops / times.loc[times["name"] == "matmul", "seconds"]).median())
        out["compute_floor"].append({
            "method": name, "rounds": rounds, "gflop": flops / 1e9, "matmul_n": matmul_n,
            "matmul_gflops": rate / 1e9, "floor_ms": 1e3 * flops / rate, "step_ms": mine["median"],
            **ratio_summary(times, name, "matmul", scale=mm_flops / flops)})
    moved = traffic(name, params, last_level_cache_bytes(device))
    if moved is not None and machine_bandwidth:
        floor, stream = bandwidth_floor(moved, machine_bandwidth)
        bound, _ = bandwidth_floor(moved.from_memory(), machine_bandwidth)
        achieved, bw = moved.bytes / (mine["median"] / 1e3), moved.bytes / floor
        out["bandwidth"].append({
            "method": name, "accounting": moved.accounting, "bytes": moved.bytes, "step_ms": mine["median"],
            "achieved_gbs": achieved / 1e9, "machine_gbs": bw / 1e9, "machine_stream": stream,
            "fraction": achieved / bw, "floor_ms": 1e3 * floor, "bound_ms": 1e3 * bound})
    return out


def unmeasured_rows(settings: Sequence[str]) -> list[dict]:
    """Placeholder rows for the CUDA comparisons of a run without a CUDA device."""
    return [{"setting": s, "device": "cuda", "dtype": d, "method": "sinkgd", "baseline": "adamw-fused",
             "note": "not measured: no CUDA device"}
            for s in settings for d in ("float32", "bfloat16")]


assert (MODEL_CONFIGS["1b"].hidden_size, MODEL_CONFIGS["1b"].intermediate_size) == (2048, 5461)
