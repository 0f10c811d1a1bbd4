"""``python -m multinorm.bench``: run the benchmark parts, write the tables, evaluate the targets."""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import pandas as pd
import torch

from ..io import atomic_write
from .measure import available_cores, dump_json, environment, memory_bandwidth
from .steps import (BANDWIDTH_COLUMNS, FLOOR_COLUMNS, GPU_SETTINGS, SETTINGS, STEP_COLUMNS, bench_setting,
                    method_names, unmeasured_rows)
from .targets import evaluate_targets, read_tables, summary_markdown
from .jobs import JOBS_COLUMNS, jobs_throughput
from .training import PROFILE_COLUMNS, THROUGHPUT_COLUMNS, TrainSetup, make_loops, train_profile, train_throughput

__all__ = ["main", "parse_args"]

TRAIN_OPTIMIZERS = ("adamw", "sinkgd", "swan")
# --quick: what the targets and the bandwidth table need
QUICK_METHODS = ("adamw-foreach", "adamw-fused", "sgd", "sinkgd", "sinkgd-torch", "swan")
QUICK_TRAIN_OPTIMIZERS = ("adamw", "sinkgd")
# timed again with every available core (a training run's default threads), after the one-thread pass
ALL_CORES_METHODS = ("adamw-fused", "adamw-foreach", "sinkgd", "sinkgd-torch")
RAW_COLUMNS = ["table", "setting", "device", "dtype", "threads", "comparison", "round", "name", "seconds", "calls",
               "optimizer_seconds"]
INT_COLUMNS = {"cores", "jobs", "threads_per_run", "steps", "threads", "matrices", "params", "rounds", "state_bytes", "peak_extra_bytes", "host_syncs", "bytes",
               "matmul_n", "vocab_size", "batch_size", "seq_len", "steps_profiled", "round", "calls"}
# option: (full run, --quick); None in the parsed arguments means "not given"
DEFAULTS = {"rounds": (7, 2), "train_rounds": (21, 2), "slow_rounds": (3, 2), "min_run_time": (0.2, 0.01),
            "bandwidth_mib": (1024, 32), "profile_steps": (4, 2), "jobs_steps": (20, 0)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog="python -m multinorm.bench", description=doc.split("\n\n")[0])
    p.add_argument("--out", default="results/bench", help="folder for the CSV tables, environment.json and "
                   "readme_bench.md (default results/bench)")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated optimizer-step settings (default: all of " + ", ".join(SETTINGS) +
                        "; hidden-350m and hidden-1b run on CUDA only)")
    p.add_argument("--methods", default=None,
                   help="comma-separated optimizers to time (default: every AdamW variant and registry optimizer; "
                        "--quick: " + ", ".join(QUICK_METHODS) + "); the AdamW reference is always timed. "
                        "Rows of other methods (and settings) already in --out are kept: each row's ratio comes "
                        "from its own interleaved comparison")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per comparison (default 7; --quick 2)")
    p.add_argument("--train-rounds", type=int, default=None,
                   help="interleaved rounds of the training-step comparison (default 21; --quick 2): a nano step "
                        "varies by a few percent from round to round, more than the optimizers differ")
    p.add_argument("--slow-rounds", type=int, default=None,
                   help="rounds for a step that takes over --slow-step seconds (default 3; --quick 2)")
    p.add_argument("--slow-step", type=float, default=1.0, help="seconds above which a step counts as slow (default 1)")
    p.add_argument("--max-step", type=float, default=15.0,
                   help="seconds (default 15): a method whose warm-up step takes longer is timed by that step "
                        "alone, in one round; one that a step on shapes / 8 predicts at over 10x this is skipped")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds each measurement runs its statement, after warm-up (torch.utils.benchmark "
                        "blocked_autorange; default 0.2; --quick 0.01)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the optimizer steps are memory bound, and one thread gives steady "
                        "timings on a shared machine; default 1)")
    p.add_argument("--no-all-cores", dest="all_cores", action="store_false",
                   help="skip the second pass at every available core (a training run's default thread count): "
                        "the optimizer steps of " + ", ".join(ALL_CORES_METHODS) + " and the training part")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default): CPU (fp32), plus CUDA (fp32 and bf16) when available")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="on CUDA, do not time torch.compile'd steps")
    p.add_argument("--skip-steps", action="store_true",
                   help="skip the optimizer-step part (its CSVs in --out are left as they are)")
    p.add_argument("--skip-train", action="store_true",
                   help="skip the nano training throughput and profile (their CSVs in --out are left as they are)")
    p.add_argument("--jobs-steps", type=int, default=None,
                   help="timed training steps per run when measuring how many runs to train at once on this "
                        "machine's cores (make figures JOBS=N; jobs_throughput.csv); 0 skips it (default 20; "
                        "--quick 0). Runs without the other parts with --skip-steps --skip-train")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="training steps profiled per optimizer (default 4; --quick 2)")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="size of the tensor that measures memory bandwidth, MiB; keep it well above the last-level "
                        "cache (default 1024; --quick 32)")
    p.add_argument("--data-dir", default=None, help="data cache for wiki-sample (default: $MULTINORM_DATA or the repository's data/)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few rounds, for tests (well under a minute); the numbers measure nothing")
    p.add_argument("--targets-only", action="store_true",
                   help="re-evaluate targets.csv and readme_bench.md from the CSVs in --out, without measuring")
    args = p.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        p.error(f"unknown settings {', '.join(unknown)}; valid: {', '.join(SETTINGS)}")
    if args.methods is not None:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        valid = set(method_names(torch.device("cuda"), True)) | set(method_names(torch.device("cpu")))
        unknown = sorted(set(args.methods) - valid)
        if unknown:
            p.error(f"unknown methods {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    if min(args.rounds, args.train_rounds, args.slow_rounds) < 1:
        p.error("--rounds, --train-rounds and --slow-rounds must be >= 1")
    return args


def _frame(rows, columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns)
    for c in INT_COLUMNS & set(columns):
        frame[c] = frame[c].astype("Int64")
    return frame


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, frame.to_csv(index=False, float_format="%.6g"))


def _update_raw(path: Path, table: str, frames: list[pd.DataFrame], partial: bool = False) -> None:
    """Replace the per-round times of one part in raw_times.csv, keeping the other part's; with ``partial``,
    only those of the comparisons measured now."""
    previous = pd.read_csv(path) if path.exists() else pd.DataFrame()
    if "table" in previous and "threads" not in previous:  # written when every time was taken at one thread
        previous = previous.assign(threads=1)
    new = [f.assign(table=table) for f in frames]
    if "table" not in previous:
        kept = []
    elif partial and new:
        measured = set(_keys(pd.concat(new), RAW_KEY))
        kept = [previous[[previous.table.iloc[i] != table or k not in measured
                          for i, k in enumerate(_keys(previous, RAW_KEY))]]]
    else:
        kept = [previous[previous["table"] != table]]
    _write_csv(_frame(pd.concat(kept + new, ignore_index=True) if kept + new else [], RAW_COLUMNS), path)


ROW_KEY = ["setting", "device", "dtype", "threads", "method"]
RAW_KEY = ["setting", "device", "dtype", "threads", "comparison"]


def thread_counts(args) -> list[int]:
    """``--threads``, then every available core (unless ``--no-all-cores``, or that is the same count)."""
    counts = [args.threads]
    if args.all_cores and available_cores() != args.threads:
        counts.append(available_cores())
    return counts


def _key_part(value) -> str:
    """A key column's value as text, the same whether it was read back from a CSV (a thread count in a column
    with gaps comes back as 2.0) or just measured (2)."""
    if pd.isna(value):
        return "nan"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _keys(frame: pd.DataFrame, key: list[str]) -> list[tuple]:
    return [tuple(_key_part(v) for v in row) for row in frame[key].itertuples(index=False)]


def _merged(path: Path, new: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The table at ``path`` with each row that ``new`` measured again replaced in place (same setting, device,
    dtype and method) and ``new``'s other rows appended: how a run with ``--methods`` updates the tables."""
    if not path.exists():
        return new
    old = pd.read_csv(path)
    if new.empty:  # nothing of this table measured now (e.g. SWAN's compute floor): keep it as it was
        return _frame(old.to_dict("records"), columns)
    fresh = dict(zip(_keys(new, ROW_KEY), new.to_dict("records")))
    rows = [fresh.pop(k, r) for k, r in zip(_keys(old, ROW_KEY), old.to_dict("records"))]
    return _frame(rows + list(fresh.values()), columns)


def _report(out: Path, env: dict | None) -> pd.DataFrame:
    """Evaluate the targets from the CSVs in ``out``; write targets.csv and readme_bench.md; print them."""
    tables = read_tables(out)
    targets = evaluate_targets(tables)
    _write_csv(targets, out / "targets.csv")
    atomic_write(out / "readme_bench.md", summary_markdown(tables, targets, env))
    if env and env.get("quick"):
        print("targets (quick run: tiny sizes, these numbers do not measure the targets):")
    else:
        print("targets:")
    with pd.option_context("display.max_colwidth", 80, "display.width", 200):
        print(targets.to_string(index=False))
    return targets


def _machine_bandwidth(devices: list[torch.device], args, log) -> list[dict]:
    """Memory bandwidth per device; on CPU with one thread, all available cores and --threads."""
    rows = []
    cores = available_cores()
    for device in devices:
        for threads in (sorted({1, cores, args.threads}) if device.type == "cpu" else [args.threads]):
            bw = memory_bandwidth(device, args.bandwidth_mib * 2**20, threads, 5 * args.min_run_time)
            for stream, value in bw.items():
                rows.append({"device": device.type, "threads": threads, "stream": stream, "gbs": value / 1e9,
                             "tensor_mib": args.bandwidth_mib})
            log(f"  memory bandwidth {device.type} {threads} thread(s): "
                + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items()))
    return rows


def _run_steps(args, devices: list[torch.device], env: dict, out: Path, log) -> None:
    """The optimizer-step part: optimizer_step.csv, compute_floor.csv, bandwidth.csv, raw times. Every method at
    ``--threads``; then, on CPU, ``ALL_CORES_METHODS`` again with every available core."""
    tables: dict[str, list] = {"optimizer_step": [], "compute_floor": [], "bandwidth": [], "raw": []}
    for pass_index, threads in enumerate(thread_counts(args)):
        torch.set_num_threads(threads)
        for device in devices:
            if pass_index and device.type != "cpu":
                continue
            machine = {r["stream"]: r["gbs"] * 1e9 for r in env["memory_bandwidth"]
                       if r["device"] == device.type and r["threads"] == threads}
            names = method_names(device, args.compile)
            wanted = args.methods or (QUICK_METHODS if args.quick else names)
            wanted = [m for m in wanted if not pass_index or m in ALL_CORES_METHODS]
            methods = [m for i, m in enumerate(names) if i == 0 or m in wanted]  # names[0]: the reference
            for dtype in ([torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]):
                for setting in args.settings:
                    if setting in GPU_SETTINGS and device.type != "cuda":
                        continue
                    log(f"== {setting} {device.type} {str(dtype).replace('torch.', '')}, {threads} thread(s)")
                    for key, rows in bench_setting(setting, device, dtype, methods, args, machine, log).items():
                        tables[key] += [r.assign(threads=threads) for r in rows] if key == "raw" else rows
                    gc.collect()
    torch.set_num_threads(args.threads)
    if args.device == "auto" and not torch.cuda.is_available():
        tables["optimizer_step"] += unmeasured_rows(args.settings)
    steps = _frame(tables["optimizer_step"], STEP_COLUMNS)
    floors = _frame(tables["compute_floor"], FLOOR_COLUMNS)
    bandwidth = _frame(tables["bandwidth"], BANDWIDTH_COLUMNS)
    partial = bool(args.methods)  # rows of the methods and settings not timed now are kept
    if partial:
        steps = _merged(out / "optimizer_step.csv", steps, STEP_COLUMNS)
        floors = _merged(out / "compute_floor.csv", floors, FLOOR_COLUMNS)
        bandwidth = _merged(out / "bandwidth.csv", bandwidth, BANDWIDTH_COLUMNS)
    _write_csv(steps, out / "optimizer_step.csv")
    _write_csv(floors, out / "compute_floor.csv")
    _write_csv(bandwidth, out / "bandwidth.csv")
    _update_raw(out / "raw_times.csv", "optimizer_step", tables["raw"], partial)
    shown = ["setting", "device", "dtype", "method", "step_ms", "ratio", "ratio_min", "ratio_max", "state_bytes",
             "peak_extra_bytes", "host_syncs"]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(steps[shown].to_string(index=False))


def _run_training(args, devices: list[torch.device], out: Path, log) -> None:
    """The training part: train_throughput.csv, train_profile.csv, raw times."""
    from ..data import load_data

    setup = TrainSetup(batch_size=2, seq_len=32, eval_tokens=32 * 8) if args.quick else TrainSetup()
    optimizers = QUICK_TRAIN_OPTIMIZERS if args.quick else TRAIN_OPTIMIZERS
    throughput, profile, raw = [], [], []
    for device in devices:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the trainer's default
        dtype_name = str(dtype).replace("torch.", "")
        log(f"== training {setup.model} {device.type} {dtype_name}: batch {setup.batch_size} x {setup.seq_len}")
        try:
            data = load_data(setup.dataset, seq_len=setup.seq_len, vocab_size=setup.vocab_size, seed=setup.seed,
                             cache_dir=args.data_dir, val_tokens=setup.eval_tokens)
        except (OSError, ValueError, RuntimeError) as exc:
            log(f"  training part skipped: {setup.dataset} could not be loaded: {exc}")
            return
        for threads in thread_counts(args) if device.type == "cpu" else [args.threads]:
            torch.set_num_threads(threads)
            log(f"  {threads} thread(s)")
            loops = make_loops(optimizers, setup, data, device, dtype)
            rows, times = train_throughput(loops, setup, device, dtype, args.train_rounds, 5 * args.min_run_time)
            throughput += rows
            raw.append(times.assign(setting=setup.model, device=device.type, dtype=dtype_name, threads=threads,
                                    comparison="training step"))
            for r in rows:
                log(f"  {r['optimizer']:8s} {r['tokens_per_s']:10,.0f} tokens/s  x{r['ratio']:.3f} "
                    f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] of {r['baseline']}; optimizer phase "
                    f"{r['optimizer_ms']:.2f} ms, x{r['optimizer_ratio']:.3f} of {r['baseline']}'s")
            profile += train_profile(loops, setup, device, dtype, args.profile_steps)
            del loops
            gc.collect()
        torch.set_num_threads(args.threads)
        del data
    _write_csv(_frame(throughput, THROUGHPUT_COLUMNS), out / "train_throughput.csv")
    _write_csv(_frame(profile, PROFILE_COLUMNS), out / "train_profile.csv")
    _update_raw(out / "raw_times.csv", "train_throughput", raw)


def measured_parts(previous: dict, parts: list[str], date: str, commit: str | None) -> tuple[dict, dict]:
    """``(measured, measured_commits)``: when and at which commit each part's tables were last measured, from
    the previous ``environment.json`` and the ``parts`` this run measures. A run of every optimizer step
    ("optimizer steps") supersedes the earlier runs of some methods ("optimizer steps (sgd)")."""
    measured, commits = dict(previous.get("measured", {})), dict(previous.get("measured_commits", {}))
    for part, when in previous.get("measured", {}).items():  # tables written before commits were recorded
        if part not in commits and when == previous.get("date"):
            commits[part] = previous.get("git_commit")
    if "optimizer steps" in parts:
        for table in (measured, commits):
            for part in [p for p in table if p.startswith("optimizer steps (")]:
                del table[part]
    measured.update({part: date for part in parts})
    commits.update({part: commit for part in parts})
    return measured, commits


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the benchmark (see the package docstring); return the targets table."""
    args = parse_args(argv)
    out = Path(args.out)
    env_path = out / "environment.json"
    if args.targets_only:
        if not read_tables(out):
            raise SystemExit(f"--targets-only: no benchmark tables in {out}; run the benchmark first")
        return _report(out, json.loads(env_path.read_text()) if env_path.exists() else None)

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {msg}" if msg.startswith("==") else msg, flush=True)

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        raise SystemExit("--device cuda: no CUDA device available")
    devices = ([torch.device("cpu")] if args.device in ("auto", "cpu") else []) + \
              ([torch.device("cuda")] if has_cuda and args.device in ("auto", "cuda") else [])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    env = environment(argv) | {"quick": args.quick, "rounds": args.rounds, "train_rounds": args.train_rounds,
                           "slow_rounds": args.slow_rounds, "min_run_time_s": args.min_run_time}
    # when each part's tables were last measured: a run that skips a part keeps that part's older tables
    previous = json.loads(env_path.read_text()) if env_path.exists() else {}
    steps_part = "optimizer steps" + (f" ({', '.join(args.methods)})" if args.methods else "")
    parts = [part for part, run in ((steps_part, not args.skip_steps), ("training", not args.skip_train),
                                    ("runs at once", args.jobs_steps > 0)) if run]
    env["measured"], env["measured_commits"] = measured_parts(previous, parts, env["date"], env["git_commit"])
    log(f"{env['cpu']}; {env['available_cores']} core(s) available; torch {env['torch']}, {env['torch_threads']} "
        f"thread(s), BLAS {env['blas']}; GPU {env['gpu'] or 'none'}; load average {env['load_average']}")
    env["memory_bandwidth"] = _machine_bandwidth(devices, args, log)
    atomic_write(env_path, dump_json(env))  # rewritten at the end, with the run's wall time
    if not args.skip_steps:
        _run_steps(args, devices, env, out, log)
    if not args.skip_train:
        _run_training(args, devices, out, log)
    if args.jobs_steps > 0:
        log(f"== runs at once: {args.jobs_steps} AdamW training steps per run, for every worker count that "
            "divides the cores")
        rows = jobs_throughput(TrainSetup(), args.jobs_steps, args.data_dir, log=log)
        _write_csv(_frame(rows, JOBS_COLUMNS), out / "jobs_throughput.csv")
    env["wall_s"] = round(time.perf_counter() - started, 1)
    atomic_write(env_path, dump_json(env))
    targets = _report(out, env)
    log(f"wrote {out} in {env['wall_s']:.0f} s")
    return targets
