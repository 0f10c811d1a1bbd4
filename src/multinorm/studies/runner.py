"""Run the study notebooks with papermill: `make figures` (SCALE=default|quick) and `make smoke`.

    python -m multinorm.studies figures --scale default   # results/, figures/, README tables
    python -m multinorm.studies figures --resume --jobs 2 # continue an interrupted campaign, 2 runs at a time
    python -m multinorm.studies figures --reuse           # redraw everything from the recorded results, train nothing
    python -m multinorm.studies figures --scale quick     # smaller budgets, into results/quick/, figures/quick/
    python -m multinorm.studies smoke                     # tiny parameters, into a temporary folder
    python -m multinorm.studies status                    # finished and unfinished runs of a campaign so far
    python -m multinorm.studies figures --only 02_convergence --set device=cuda --set dataset=c4

Each notebook's `parameters` cell holds its default-scale values; a scale only overrides some of
them. Executed copies go to `<results>/notebooks/`, and the wall time of each notebook (full runs only)
to `<results>/notebooks/timing.csv`, from which README states how long `make figures` takes. Only the
default scale, written to `results/`, rewrites README's results sections.

The notebooks resolve their path parameters from the repository root (`multinorm.paths`), so they write to
the same places whether run from here or opened in Jupyter in `notebooks/` (`make lab`); relative
`--results-dir` and `--figures-dir` are taken from the current directory. In reuse mode nothing is trained or
measured: 02 and 04 read their finished runs (`multinorm.studies.sweep`), 01 and 03 the tables they recorded, checked
against their parameters (`multinorm.studies.report.reuse_tables`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from multinorm.io import parse_assignment
from multinorm.paths import repo_root

__all__ = ["NOTEBOOKS", "SCALES", "default_jobs", "run_notebook", "run_all", "run_time_table", "unfinished_runs", "main"]

REPO = repo_root()
NOTEBOOKS = ("01_fixed_point", "02_convergence", "03_memory_throughput", "04_ablations", "05_scaling")

# Per scale, per notebook: overrides of the notebook's own `parameters` cell (which is the default scale).
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {name: {} for name in NOTEBOOKS},
    "quick": {
        "01_fixed_point": {"shape_sizes": ["60m"], "swan_shape_sizes": ["60m"], "max_iters": 12,
                           "capture_tokens": 65_536},
        "02_convergence": {"tokens": 65_536, "eval_interval": 8, "eval_tokens": 16_384,
                           "probe_regimes": [{"vocab_size": 1024, "batch_size": 8, "tokens": 65_536}],
                           "methods": ["adamw", "adamw-split", "frozen-hidden", "sinkgd", "swan"],
                           "lr_grids": {"adamw": [2e-3, 4e-3], "adamw-split": [5e-4, 1e-3], "frozen-hidden": [0.0],
                                        "sinkgd": [5e-4, 1e-3], "swan": [2e-3, 4e-3]},
                           "max_extensions": 1, "core_seeds": 2, "other_seeds": 2},
        "03_memory_throughput": {"measure_steps": 2, "methods": ["adamw", "sgd", "sinkgd", "swan", "muon", "apollo-mini"]},
        "04_ablations": {"tokens": 65_536, "eval_interval": 8, "eval_tokens": 16_384, "lr_multipliers": [0.5, 1.0],
                         "max_extensions": 0, "ablation_seeds": 2, "variants": ["sinkgd-L1", "swan-gradnorm-only"]},
        "05_scaling": {"tokens": 65_536, "eval_interval": 8, "eval_tokens": 16_384, "batch_sizes": [8, 32],
                       "points": 2, "max_extensions": 1, "seeds": 2, "probe_lrs": [4e-3]},
    },
    "smoke": {
        "01_fixed_point": {"shape_sizes": [], "extra_shapes": [[24, 16], [16, 40]], "max_iters": 4,
                           "limit_iters": 20, "capture_tokens": 2_048, "seq_len": 32, "batch_size": 2},
        "02_convergence": {"tokens": 2 * 32 * 4, "seq_len": 32, "batch_size": 2, "vocab_size": 4096,
                           "eval_interval": 2, "eval_tokens": 32 * 8,
                           "probe_regimes": [{"vocab_size": 4096, "batch_size": 2, "tokens": 2 * 32 * 2}],
                           "methods": ["adamw", "adamw-split", "frozen-hidden", "sinkgd", "swan"],
                           "lr_grids": {"adamw": [1e-3], "adamw-split": [1e-3], "frozen-hidden": [0.0],
                                        "sinkgd": [1e-3], "swan": [1e-3]},
                           "max_extensions": 0, "core_seeds": 2, "other_seeds": 2},
        "03_memory_throughput": {"measure_steps": 1, "measure_model": "nano", "seq_len": 32, "batch_size": 2,
                                 "methods": ["adamw", "sinkgd"], "rss_repeats": 1},
        "04_ablations": {"tokens": 2 * 32 * 4, "seq_len": 32, "batch_size": 2, "vocab_size": 4096,
                         "lr_multipliers": [1.0], "max_extensions": 0, "ablation_seeds": 2, "eval_interval": 2,
                         "eval_tokens": 32 * 8, "variants": ["sinkgd-L1", "swan-gradnorm-only"]},
        "05_scaling": {"tokens": 2 * 32 * 4, "seq_len": 32, "batch_size": 2, "vocab_size": 4096, "eval_interval": 2,
                       "eval_tokens": 32 * 8, "batch_sizes": [2, 4], "points": 1, "max_extensions": 0, "seeds": 2,
                       "probe_batch_sizes": [8], "probe_lrs": [1e-3], "probe_beta2": [0.95]},
    },
}


# `--jobs` when not given: one single-thread run per core on the CPU, up to this many at once.
MAX_DEFAULT_JOBS = 8


def default_jobs(overrides: dict[str, Any] | None = None) -> int:
    """Runs trained at once when ``--jobs`` is not given: one per core (at most ``MAX_DEFAULT_JOBS``), each
    with one torch thread, because at the studies' model size several one-thread runs train more tokens per
    second in total than one run using every core (``make bench`` measures it: ``jobs_throughput.csv``); 1
    when the notebooks train on a GPU (``--set device=cuda``), which one run at a time uses best."""
    if str((overrides or {}).get("device", "cpu")).startswith("cuda"):
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_JOBS))


def run_notebook(name: str, parameters: dict[str, Any], output_dir: Path, cwd: Path = REPO) -> float:
    """Execute `notebooks/<name>.ipynb` with `parameters`; write the executed copy; return seconds taken."""
    import papermill

    from multinorm.studies.sweep import RUN_LOG_ENV

    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    previous = os.environ.get(RUN_LOG_ENV)
    os.environ[RUN_LOG_ENV] = "1"  # the kernel inherits it: its grids report each finished run here
    try:
        papermill.execute_notebook(
            str(REPO / "notebooks" / f"{name}.ipynb"), str(output_dir / f"{name}.ipynb"),
            parameters=parameters, kernel_name="python3", cwd=str(cwd), progress_bar=False,
            log_output=False, request_save_on_cell_execute=False)
    finally:
        if previous is None:
            os.environ.pop(RUN_LOG_ENV)
        else:
            os.environ[RUN_LOG_ENV] = previous
    return time.perf_counter() - start


def _stop_reason(err: BaseException) -> str | None:
    """Why a study stopped, if it was stopped rather than failed: Ctrl-C here, a stop signal to the kernel
    (its grid re-raises the signal once the run in progress has saved its state, and SIGTERM ends the
    kernel), or a KeyboardInterrupt in a cell; None for any other error."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if type(err).__name__ == "DeadKernelError":
        return "the notebook kernel ended (a stop signal, or killed from outside, e.g. for lack of memory)"
    if type(err).__name__ == "PapermillExecutionError" and getattr(err, "ename", "") == "KeyboardInterrupt":
        return "a notebook cell was interrupted"
    return None


def run_all(scale: str, results_dir: Path, figures_dir: Path, only: list[str] | None = None,
            overrides: dict[str, Any] | None = None, run_mode: str = "train", jobs: int = 1,
            cwd: Path = REPO) -> dict[str, float]:
    """Run the notebooks in order (later ones read earlier ones' CSVs), their kernels in `cwd`; return seconds
    per notebook."""
    if scale not in SCALES:
        raise SystemExit(f"error: unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    names = only or list(NOTEBOOKS)
    unknown = sorted(set(names) - set(NOTEBOOKS))
    if unknown:
        raise SystemExit(f"error: unknown notebook(s) {unknown}; valid: {', '.join(NOTEBOOKS)}")
    timings = {}
    for name in names:
        params = {"results_dir": str(results_dir), "figures_dir": str(figures_dir), "run_mode": run_mode,
                  "jobs": jobs, "scale": scale, **SCALES[scale][name], **(overrides or {})}
        print(f"[{time.strftime('%H:%M:%S')}] {name} ({scale}) ...", flush=True)
        timings[name] = run_notebook(name, params, results_dir / "notebooks", cwd)
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {timings[name] / 60:.1f} min", flush=True)
    return timings


def run_time_table(results_dir: Path) -> "pd.DataFrame":
    """Training time recorded by the finished runs under ``<results>/runs/<study>/``, per study: the number of
    runs, core-hours (each run's wall time x its torch threads; JOBS=2 on 2 cores runs two one-thread runs at
    once) and the hours that makes on this machine's cores. It is summed over every sitting, so it measures a
    campaign computed with RESUME=1 as well as one uninterrupted `make figures`. The playground's runs (not a
    study, and not committed) are left out."""
    import pandas as pd

    rows = []
    for study in sorted(p for p in (results_dir / "runs").glob("*") if p.is_dir() and p.name != "playground"):
        seconds, n = 0.0, 0
        for summary_path in study.glob("*/summary.json"):
            summary = json.loads(summary_path.read_text())
            config = json.loads((summary_path.parent / "config.json").read_text())
            if summary.get("status") != "completed" or summary.get("wall_s") is None:
                continue
            seconds += summary["wall_s"] * config.get("torch_threads", 1)
            n += 1
        if n:
            rows.append({"study": study.name, "runs": n, "core_hours": seconds / 3600,
                         "hours": seconds / 3600 / (os.cpu_count() or 1)})
    return pd.DataFrame(rows, columns=["study", "runs", "core_hours", "hours"])


def unfinished_runs(results_dir: Path) -> "pd.DataFrame":
    """The study runs under ``<results>/runs/<study>/`` that have not finished (interrupted, or training now):
    the step they have logged and the step count they train for. `make figures RESUME=1` continues them from
    their last checkpoint."""
    import pandas as pd

    rows = []
    for config_path in sorted((results_dir / "runs").glob("*/*/config.json")):
        run_dir = config_path.parent
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if summary.get("status") in ("completed", "diverged"):
            continue
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        rows.append({"study": run_dir.parent.name, "run": run_dir.name,
                     "step": json.loads(lines[-1])["step"] if lines else 0,
                     "steps": json.loads(config_path.read_text()).get("steps"),
                     "status": summary.get("status", "started")})
    return pd.DataFrame(rows, columns=["study", "run", "step", "steps", "status"])


def status(results_dir: Path) -> str:
    """What `python -m multinorm.studies status` prints: finished runs and their training time per study,
    then every unfinished run."""
    finished, unfinished = run_time_table(results_dir), unfinished_runs(results_dir)
    lines = [f"{results_dir / 'runs'}:"]
    lines += [f"  {r.study}: {r.runs} finished runs, {r.core_hours:.2f} core-hours" for r in finished.itertuples()]
    if unfinished.empty:
        lines.append("  no unfinished run")
    else:
        lines.append(f"  {len(unfinished)} unfinished (make figures RESUME=1 continues them from their checkpoints):")
        lines += [f"    {r.study}/{r.run}: last logged step {r.step} of {r.steps}" for r in unfinished.itertuples()]
    return "\n".join(lines)


def _write_timing(results_dir: Path, scale: str, timings: dict[str, float]) -> None:
    """Merge `timings` into results/notebooks/timing.csv and write the README's timing table next to it,
    followed by the training time the run folders record (:func:`run_time_table`)."""
    import pandas as pd

    path = results_dir / "notebooks" / "timing.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Seconds are kept to 0.1 s; the minutes below are computed from the rounded values.
    table = pd.DataFrame({"scale": scale, "notebook": list(timings), "seconds": [round(t, 1) for t in timings.values()]})
    if path.exists():  # keep the other scales' and notebooks' last timings
        old = pd.read_csv(path, dtype={"scale": str, "notebook": str, "seconds": float})
        table = pd.concat([old[list(table.columns)], table], ignore_index=True)
    table = table.drop_duplicates(["scale", "notebook"], keep="last").sort_values(["scale", "notebook"], ignore_index=True)
    lines = ["| scale | notebook | minutes |", "|---|---|---|"]
    for scale_, rows in table.groupby("scale", sort=True):
        lines += [f"| {scale_} | {row.notebook} | {row.seconds / 60:.1f} |" for row in rows.itertuples()]
        lines.append(f"| {scale_} | **all** | **{rows.seconds.sum() / 60:.1f}** |")
    if table.empty:
        lines = ["(none recorded yet)"]
    else:
        table.to_csv(path, index=False, float_format="%.1f")
    runs = run_time_table(results_dir)
    run_lines = ["| study | finished runs | core-hours | hours on " f"{os.cpu_count()} cores |", "|---|---|---|---|"]
    run_lines += [f"| {r.study} | {r.runs} | {r.core_hours:.2f} | {r.hours:.2f} |" for r in runs.itertuples()]
    run_lines.append(f"| **all** | **{runs.runs.sum()}** | **{runs.core_hours.sum():.2f}** | **{runs.hours.sum():.2f}** |")
    (path.parent / "readme_timing.md").write_text(
        f"Measured wall time of `make figures` in one sitting (machine with {os.cpu_count()} CPU cores):\n\n"
        + "\n".join(lines) + "\n\nTraining time recorded by the run folders of `results/runs/`, summed over every "
        "sitting (a campaign continued with `RESUME=1` included; core-hours = each run's wall time × its torch "
        "threads):\n\n" + "\n".join(run_lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multinorm.studies", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figures", help="run every study notebook and regenerate figures/ and README tables")
    fig.add_argument("--scale", default="default", choices=[s for s in SCALES if s != "smoke"], help="study size")
    fig.add_argument("--only", nargs="+", metavar="NOTEBOOK", help=f"run only these of: {', '.join(NOTEBOOKS)}")
    fig.add_argument("--set", action="append", default=[], type=parse_assignment, metavar="KEY=VALUE",
                     help="override a notebook parameter for every notebook (e.g. device=cuda, dataset=c4, model=60m)")
    modes = fig.add_mutually_exclusive_group()
    modes.add_argument("--resume", action="store_true",
                       help="train only the runs that are missing or unfinished; keep finished runs with the same "
                            "configuration (continues an interrupted campaign)")
    modes.add_argument("--reuse", action="store_true",
                       help="train and measure nothing: redraw every figure and table from the finished runs and "
                            "recorded tables in the results folder")
    fig.add_argument("--jobs", type=int, default=None,
                     help="runs trained in parallel worker processes, each with cores / jobs torch threads "
                          f"(default: one per core, at most {MAX_DEFAULT_JOBS}; 1 with --set device=cuda)")
    fig.add_argument("--results-dir", default=None,
                     help="where CSVs, runs and executed notebooks go (default: results/, or results/<scale>/ for "
                          "a scale other than default)")
    fig.add_argument("--figures-dir", default=None,
                     help="where PNG/PDF figures go (default: figures/, or figures/<scale>/ for a scale other than "
                          "default)")
    fig.add_argument("--no-readme", action="store_true",
                     help="do not rewrite README's results sections (only the default scale in results/ ever does)")
    smoke = sub.add_parser("smoke", help="run every notebook with tiny parameters into a temporary folder")
    smoke.add_argument("--keep", action="store_true", help="print and keep the temporary folder")
    stat = sub.add_parser("status", help="list the finished and unfinished runs of the studies so far")
    stat.add_argument("--results-dir", default=None, help="the results folder (default: results/)")
    args = parser.parse_args(argv)

    os.environ.setdefault("PYTHONHASHSEED", "0")
    if args.command == "smoke":
        tmp = Path(tempfile.mkdtemp(prefix="multinorm-smoke-"))
        run_all("smoke", tmp / "results", tmp / "figures")
        print(f"smoke run passed ({tmp if args.keep else 'temporary folder removed'})")
        if not args.keep:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        return 0

    if args.command == "status":
        print(status(Path(args.results_dir).absolute() if args.results_dir else REPO / "results"))
        return 0

    if args.jobs is None:
        args.jobs = default_jobs(dict(args.set))
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    sub_dir = "" if args.scale == "default" else args.scale  # other scales never overwrite the committed ones
    results_dir = Path(args.results_dir).absolute() if args.results_dir else REPO / "results" / sub_dir
    figures_dir = Path(args.figures_dir).absolute() if args.figures_dir else REPO / "figures" / sub_dir
    mode = "resume" if args.resume else "reuse" if args.reuse else "train"
    start = time.perf_counter()
    try:
        timings = run_all(args.scale, results_dir, figures_dir, args.only, dict(args.set), mode, args.jobs)
    except BaseException as err:
        reason = _stop_reason(err)
        if reason is None:
            raise
        print(f"stopped: {reason}. Every finished run is kept in {results_dir / 'runs'}, and an unfinished one "
              "at its last checkpoint; `make figures RESUME=1` (--resume) continues.", file=sys.stderr)
        return 130
    # read-back or partial runs say nothing about the time a full run takes; the run folders' own times are
    # summed in every mode
    _write_timing(results_dir, args.scale, timings if mode == "train" else {})
    if not args.no_readme and args.scale == "default" and results_dir.resolve() == (REPO / "results").resolve():
        from multinorm.studies.report import update_readme

        updated = update_readme(REPO / "README.md", results_dir)
        print(f"README sections updated: {', '.join(updated) or 'none'}")
    print(f"all notebooks done in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
