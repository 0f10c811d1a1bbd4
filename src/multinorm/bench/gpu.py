"""``make gpu`` (``python -m multinorm.bench.gpu``): everything this project measures on a GPU, in one run.

A GPU is lent to this project rarely and briefly, so this script is prepared to run once, in under 8 minutes on
one H100, and to keep what it finished: each part writes its CSV to ``--out`` (``results/gpu/``) as soon as it is
done, and every row names the device. In order of priority:

a. ``optimizer_step.csv``, ``bandwidth.csv``: one optimizer step, bf16 and fp32, on the ``1b`` block and on the
   full hidden-matrix sets of 350M and 1B, for SinkGD (eager and ``torch.compile``\\ d), SWAN, Muon and AdamW
   (foreach), each timed in interleaved rounds against AdamW(fused) (``multinorm.bench.steps``), with the
   fraction of the GPU's measured memory bandwidth (``memory_bandwidth.csv``);
b. ``training.csv``: training tokens/s and peak GPU memory of 350M and 1B in bf16 for AdamW, SinkGD, SWAN and
   GaLore, at the papers' sequence length and a micro-batch that fits, on random tokens, timed after warm-up
   steps (the papers' memory claim: SinkGD/SWAN about 50 % of AdamW end to end; SinkGD's raw throughput 1.09x);
c. ``parallel.csv``: the trainer on two processes (DDP and FSDP2) on the GPUs, where there are two (NCCL; each
   rank takes the GPU of its local rank, so one GPU cannot host both).

``--dry-run`` runs the same code on the CPU at tiny shapes (``make test`` does, so the script cannot rot between
GPU sessions).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from .measure import dump_json, environment, memory_bandwidth
from .steps import BANDWIDTH_COLUMNS, STEP_COLUMNS, bench_setting

__all__ = ["main", "parse_args", "Plan", "GPU_PLAN", "DRY_PLAN"]

STEP_METHODS = ("adamw-fused", "adamw-foreach", "sinkgd", "sinkgd+compile", "swan", "muon")
TRAIN_METHODS = ("adamw", "sinkgd", "swan", "galore")
TRAIN_COLUMNS = ["model", "device", "device_name", "dtype", "optimizer", "micro_batch", "seq_len", "steps",
                 "tokens_per_s", "step_ms", "peak_memory_gb", "peak_memory_ratio", "parameters", "note"]
PARALLEL_COLUMNS = ["mode", "device", "device_name", "processes", "status", "seconds", "note"]


@dataclass(frozen=True)
class Plan:
    """What a run measures: the optimizer-step settings and dtypes, the training models with their micro-batch,
    the steps timed after warm-up, the bench's rounds, and the device."""

    device: str
    step_settings: tuple[str, ...]
    step_dtypes: tuple[torch.dtype, ...]
    quick_shapes: bool
    train_models: tuple[tuple[str, int], ...]  # (model, micro-batch)
    train_dtype: torch.dtype
    seq_len: int
    vocab_size: int | None
    warmup_steps: int
    timed_steps: int
    rounds: int
    bandwidth_mib: int
    parallel_model: str
    budget_s: dict[str, float] | None = None  # seconds per part: past it, the rest of the part is skipped (and said)


# the 8-minute plan on one H100: about 4.5 min of optimizer steps, 2.5 of training, 1 of two-process runs
GPU_PLAN = Plan("cuda", ("block-1b", "hidden-350m", "hidden-1b"), (torch.bfloat16, torch.float32), False,
                (("350m", 64), ("1b", 16)), torch.bfloat16, 256, None, 5, 20, 3, 1024, "nano",
                {"steps": 270.0, "training": 150.0, "parallel": 60.0})
DRY_PLAN = Plan("cpu", ("block-1b",), (torch.float32,), True, (("nano", 2),), torch.float32, 32, 256, 1, 2, 1, 8,
                "nano")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _write(rows: list[dict], columns: list[str], path: Path) -> None:
    """Write (replace) one part's table at once, so a later timeout keeps it."""
    frame = pd.DataFrame(rows)
    frame = frame.reindex(columns=columns + [c for c in frame.columns if c not in columns])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def part_steps(plan: Plan, device: torch.device, out: Path, log) -> None:
    """Part a: optimizer steps against AdamW(fused), with bandwidth fractions."""
    name = _device_name(device)
    bw = memory_bandwidth(device, plan.bandwidth_mib * 2**20, torch.get_num_threads(), 0.05)
    _write([{"device": device.type, "device_name": name, "stream": k, "gbs": v / 1e9} for k, v in bw.items()],
           ["device", "device_name", "stream", "gbs"], out / "memory_bandwidth.csv")
    log("memory bandwidth: " + ", ".join(f"{k} {v / 1e9:.0f} GB/s" for k, v in bw.items()))
    args = SimpleNamespace(quick=plan.quick_shapes, max_step=15.0, rounds=plan.rounds, slow_rounds=2, slow_step=1.0,
                           min_run_time=0.05)
    methods = [m for m in STEP_METHODS if device.type == "cuda" or not m.endswith("+compile")]
    steps, bandwidth = [], []
    start, budget = time.perf_counter(), (plan.budget_s or {}).get("steps", float("inf"))
    for dtype in plan.step_dtypes:
        for setting in plan.step_settings:
            spent = time.perf_counter() - start
            if spent > budget:  # keep the run inside its time: say what was left out
                steps.append({"setting": setting, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                              "method": "all", "note": f"not measured: the part's {budget:.0f} s were spent",
                              "device_name": name})
                continue
            # compiling takes tens of seconds per setting: the compiled step only while the part is ahead of time
            now = [m for m in methods if not m.endswith("+compile") or spent < 0.5 * budget]
            log(f"== step {setting} {str(dtype).replace('torch.', '')}")
            tables = bench_setting(setting, device, dtype, now, args, bw, log)
            steps += [{**r, "device_name": name} for r in tables["optimizer_step"]]
            bandwidth += [{**r, "device_name": name} for r in tables["bandwidth"]]
            _write(steps, STEP_COLUMNS + ["device_name"], out / "optimizer_step.csv")
            _write(bandwidth, BANDWIDTH_COLUMNS + ["device_name"], out / "bandwidth.csv")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _train_one(model_name: str, optimizer: str, micro_batch: int, plan: Plan, device: torch.device) -> dict:
    from ..llama import build_model
    from ..optim import build_optimizer

    hparams = {"rank": 256, "update_proj_gap": 200} if optimizer == "galore" else {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(model_name, plan.vocab_size, seed=0, device=device, dtype=plan.train_dtype)
    vocab = model.config.vocab_size
    opt = build_optimizer(model, optimizer, 1e-3, **hparams)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, vocab, (micro_batch, plan.seq_len), generator=gen, device=device)

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(plan.warmup_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(plan.timed_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / plan.timed_steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in model.parameters())
    return {"micro_batch": micro_batch, "seq_len": plan.seq_len, "steps": plan.timed_steps,
            "tokens_per_s": micro_batch * plan.seq_len / seconds, "step_ms": 1e3 * seconds,
            "peak_memory_gb": peak / 1e9, "parameters": params}


def part_training(plan: Plan, device: torch.device, out: Path, log) -> None:
    """Part b: tokens/s and peak memory of whole training steps, per model and optimizer."""
    name, rows = _device_name(device), []
    start, budget = time.perf_counter(), (plan.budget_s or {}).get("training", float("inf"))
    for model_name, micro_batch in plan.train_models:
        adamw_peak = None
        for optimizer in TRAIN_METHODS:
            row = {"model": model_name, "device": device.type, "device_name": name,
                   "dtype": str(plan.train_dtype).replace("torch.", ""), "optimizer": optimizer}
            if time.perf_counter() - start > budget:
                row["note"] = f"not measured: the part's {budget:.0f} s were spent"
                rows.append(row)
                _write(rows, TRAIN_COLUMNS, out / "training.csv")
                continue
            try:
                row |= _train_one(model_name, optimizer, micro_batch, plan, device)
                adamw_peak = row["peak_memory_gb"] if optimizer == "adamw" else adamw_peak
                row["peak_memory_ratio"] = row["peak_memory_gb"] / adamw_peak if adamw_peak else float("nan")
                log(f"  train {model_name} {optimizer:7s} {row['tokens_per_s']:12,.0f} tokens/s, "
                    f"peak {row['peak_memory_gb']:.2f} GB")
            except Exception as exc:  # out of memory or a baseline package: record it, go on
                row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                log(f"  train {model_name} {optimizer:7s} {row['note']}")
            rows.append(row)
            _write(rows, TRAIN_COLUMNS, out / "training.csv")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def part_parallel(plan: Plan, device: torch.device, out: Path, log, timeout: float = 180) -> None:
    """Part c: the trainer on two processes, DDP then FSDP2, a few steps of ``plan.parallel_model``."""
    name, rows = _device_name(device), []
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    for mode in ("ddp", "fsdp"):
        row = {"mode": mode, "device": device.type, "device_name": name, "processes": 2}
        if device.type == "cuda" and gpus < 2:
            row |= {"status": "not run", "note": f"{gpus} GPU: each rank takes the GPU of its local rank"}
        else:
            with tempfile.TemporaryDirectory() as tmp:
                text = Path(tmp) / "corpus.txt"  # local text: the GPU machine reaches no corpus
                gen = torch.Generator().manual_seed(0)
                words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(n),), generator=gen))
                         for n in torch.randint(2, 9, (20_000,), generator=gen)]
                text.write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, len(words), 20)) + "\n")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                       str(29500 + (os.getpid() % 1000)), "-m", "multinorm.train", "--model", plan.parallel_model,
                       "--dataset", "local", "--data-files", str(text), "--cache-dir", str(Path(tmp) / "cache"),
                       "--device", device.type, "--parallel", mode, "--optimizer", "sinkgd", "--batch-size", "4",
                       "--seq-len", "32", "--tokens", str(4 * 32 * 4), "--eval-interval", "2", "--eval-tokens",
                       "256", "--vocab-size", "512", "--results-dir", str(Path(tmp) / "runs"), "--no-progress",
                       "--no-checkpoint"]
                start = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                    ok = proc.returncode == 0
                    said = [line for line in proc.stderr.splitlines() if "error" in line.lower()] or [""]
                    row |= {"status": "passed" if ok else "failed", "note": "" if ok else said[0].strip()[:300]}
                except subprocess.TimeoutExpired:
                    row |= {"status": "failed", "note": f"timed out after {timeout:.0f} s"}
                row["seconds"] = time.perf_counter() - start
        log(f"  parallel {mode}: {row['status']} {row.get('note', '')}")
        rows.append(row)
        _write(rows, PARALLEL_COLUMNS, out / "parallel.csv")


PARTS = {"steps": part_steps, "training": part_training, "parallel": part_parallel}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m multinorm.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/gpu", help="folder of the tables (default results/gpu)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts, in this order: "
                   + ", ".join(PARTS))
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny shapes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; `make gpu` needs a GPU (`--dry-run` runs it on the CPU at tiny shapes)",
              file=sys.stderr)
        return 2
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        print(f"error: unknown part(s) {unknown}; valid: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    out, device, t0 = Path(args.out), torch.device(plan.device), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    env = environment(sys.argv[1:] if argv is None else argv) | {"device_name": _device_name(device),
                                                                 "dry_run": args.dry_run}
    (out / "environment.json").write_text(dump_json(env))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    log(f"device: {env['device_name']}")
    for part in args.parts.split(","):
        try:
            PARTS[part](plan, device, out, log)
        except Exception as exc:  # a failed part must not cost the parts after it
            log(f"part {part} FAILED: {type(exc).__name__}: {exc}")
        log(f"part {part} done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
