"""Grids of training runs for the studies: run them (in parallel workers), resume or reuse them, tabulate.

A study is a list of overrides of one base `TrainConfig`. Each run lands in
`results/runs/<study>/<label>-lr<lr>-seed<seed>-<key>/` like any CLI run, where `<key>` is a short hash of
the run's full configuration (everything that changes what it computes; not the code's commit), so a
notebook's tables can always be rebuilt from the run folders alone (`load_runs`, `load_curves`).

Three modes, one per `make figures` variant:

    train    train every run again, replacing its folder              (make figures)
    resume   keep finished runs with the same configuration, continue   (make figures RESUME=1)
             unfinished ones from their checkpoint, train missing ones
    reuse    train nothing: read the finished runs, fail on a missing one (make figures REUSE=1)

`jobs > 1` trains independent runs in that many worker processes, each with `cores // jobs` torch threads
(small models scale poorly over threads, so several single-thread runs beat one two-thread run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from tqdm.auto import tqdm

from multinorm.train import RunResult, SignalLatch, TrainConfig, read_metrics, train

__all__ = ["MODES", "MissingRunsError", "config_key", "run_id", "run_one", "run_grid", "load_runs", "load_curves",
           "best_lr"]

MODES = ("train", "resume", "reuse")
# Settings that change how or where a run is kept, not what it computes (the process layout computes the
# same steps up to rounding).
_BOOKKEEPING = {"save_checkpoint", "checkpoint_interval", "progress", "results_dir", "run_id", "cache_dir",
                "parallel"}
# A run that ended with one of these is a result; an interrupted one is not.
_FINISHED = {"completed", "diverged"}
# Study runs checkpoint this many times, so an interrupted campaign loses at most a quarter of a run.
_CHECKPOINTS_PER_RUN = 4
# Set (to anything) by `multinorm.studies` for the notebook kernels it starts: a grid then also reports each
# finished run as a line on the process's original stderr. A kernel draws tqdm as a widget in the notebook,
# so without these lines an hours-long `make figures` shows nothing in its terminal or log.
RUN_LOG_ENV = "MULTINORM_RUN_LOG"


class MissingRunsError(RuntimeError):
    """`reuse` mode met runs that are not in the results folder."""


def _computed(cfg: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    d = dataclasses.asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    d = json.loads(json.dumps(d))  # as recorded in config.json (tuples become lists)
    return {k: v for k, v in d.items() if k not in _BOOKKEEPING}


def config_key(cfg: TrainConfig) -> str:
    """Eight hex digits identifying what `cfg` computes (bookkeeping settings aside)."""
    text = json.dumps(_computed(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_id(label: str, lr: float, seed: int, key: str) -> str:
    """Folder name of one study run: <label>-lr<lr>-seed<seed>-<config key>."""
    return f"{label}-lr{lr:g}-seed{seed}-{key}"


def _recorded(run_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(config, summary) as recorded in a run folder; None for what is missing."""
    config_path, summary_path = run_dir / "config.json", run_dir / "summary.json"
    config = json.loads(config_path.read_text())["config"] if config_path.exists() else None
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return config, summary


def _action(cfg: TrainConfig, mode: str) -> tuple[str, RunResult | None]:
    """What `mode` does with `cfg`'s folder: ("read", result), ("resume", None), ("train", None) or
    ("missing", None)."""
    run_dir = Path(cfg.results_dir) / cfg.run_id
    if mode == "train":
        return "train", None
    config, summary = _recorded(run_dir)
    same = config is not None and _computed(config) == _computed(cfg)
    if same and summary is not None and summary.get("status") in _FINISHED:
        return "read", RunResult(run_dir, summary)
    if mode == "reuse":
        return "missing", None
    if same and (run_dir / "checkpoint.pt").exists():
        return "resume", None
    return "train", None


# A study worker's SIGINT/SIGTERM latch (`_start_worker`): it keeps a signal that reaches the worker between
# runs or during a run's last step, and the worker then starts no further run. (The pool hands each worker its
# next run before the parent can cancel it, so the parent alone cannot stop the grid promptly.)
_latch: SignalLatch | None = None


def _start_worker() -> None:
    global _latch
    _latch = SignalLatch().install()


def _execute(cfg: TrainConfig, action: str, threads: int | None = None, keep_checkpoint: bool = True,
             worker: bool = False) -> RunResult | None:
    """Train (or resume) one run, in the caller's process or in a worker (``worker=True``: None, and no run,
    once the worker has received a stop signal). Study grids drop the checkpoint of a finished run (their
    runs are read back from the metrics); a single run keeps it."""
    if worker and _latch is not None and _latch.signum is not None:
        return None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    result = train(cfg, resume=action == "resume", overwrite=action == "train")
    if not keep_checkpoint and result.status in _FINISHED:
        (result.run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return result


def _reraise_interrupt(result: RunResult) -> None:
    """Re-raise the stop signal a run received (it stopped the run, or came during its last step)."""
    if result.signal is not None:
        signal.raise_signal(signal.Signals[result.signal])


def run_one(cfg: TrainConfig, mode: str = "train") -> RunResult:
    """One run in `mode` (see the module docstring). A run stopped by SIGINT/SIGTERM re-raises that signal
    once `train` has saved its state, so a Ctrl-C stops the whole study, not just its current run."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    action, result = _action(cfg, mode)
    if action == "missing":
        raise MissingRunsError(f"no finished run with this configuration in {Path(cfg.results_dir) / cfg.run_id}; "
                               "train it first (mode 'resume' or 'train')")
    if result is None:
        result = _execute(cfg, action)
        _reraise_interrupt(result)
    return result


def _configs(base: TrainConfig, grid: Iterable[dict[str, Any]], results_dir: str | Path
             ) -> list[tuple[TrainConfig, str | None]]:
    out = []
    for override in grid:
        override = dict(override)
        tag = override.pop("tag", None)
        cfg = dataclasses.replace(base, **override, results_dir=str(results_dir), progress=False, run_id=None)
        cfg.save_checkpoint = True
        cfg.checkpoint_interval = max(1, cfg.steps // _CHECKPOINTS_PER_RUN)
        cfg.run_id = run_id(tag or cfg.optimizer, cfg.lr, cfg.seed, config_key(cfg))
        out.append((cfg, tag))
    return out


class _RunLog:
    """One line per grid event on ``sys.__stderr__`` (the terminal, even from a notebook kernel), if
    ``$MULTINORM_RUN_LOG`` is set: the plan, then each finished run with an estimate of the time left."""

    def __init__(self, name: str, total: int, todo: int, jobs: int):
        self.enabled = bool(os.environ.get(RUN_LOG_ENV))
        self.name, self.total, self.todo, self.done, self.start = name, total, todo, 0, time.monotonic()
        self.write(f"{total} runs, {total - todo} recorded, {todo} to train"
                   + (f" in {jobs} workers" if jobs > 1 and todo > 1 else ""))

    def write(self, message: str) -> None:
        if self.enabled and sys.__stderr__ is not None:
            print(f"[{time.strftime('%H:%M:%S')}] {self.name}: {message}", file=sys.__stderr__, flush=True)

    def finished(self, cfg: TrainConfig, result: RunResult) -> None:
        self.done += 1
        loss = result.summary.get("final_val_loss")
        left = self.todo - self.done
        eta = (time.monotonic() - self.start) / self.done * left / 60
        self.write(f"{self.total - left}/{self.total} {cfg.run_id} {result.status}"
                   + (f", val loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
                   + (f"; {left} to go, about {eta:.0f} min" if left else "; grid done"))


def run_grid(base: TrainConfig, grid: Iterable[dict[str, Any]], results_dir: str | Path, *,
             mode: str = "train", jobs: int = 1, progress: bool = True) -> pd.DataFrame:
    """Run every override in `grid` on top of `base` in `mode`; return one summary row per run, in grid order.

    Each override may set any `TrainConfig` field plus `tag` (a label kept in the table and in the run id,
    e.g. an ablation name). Diverged runs stay in the table with `status == "diverged"` and an infinite final
    loss, so a sweep never dies on a bad lr. With `jobs > 1` the runs to train go to that many worker
    processes. In `reuse` mode every missing run is listed in one `MissingRunsError`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    planned = _configs(base, grid, results_dir)
    actions = [_action(cfg, mode) for cfg, _ in planned]
    missing = [cfg.run_id for (cfg, _), (action, _) in zip(planned, actions) if action == "missing"]
    if missing:
        raise MissingRunsError(f"{len(missing)} run(s) missing from {results_dir} (train them with "
                               f"RESUME=1 first): {', '.join(missing)}")
    results: list[RunResult | None] = [result for _, result in actions]
    todo = [i for i, (action, _) in enumerate(actions) if action in ("train", "resume")]
    bar = tqdm(total=len(planned), initial=len(planned) - len(todo), desc=Path(results_dir).name, unit="run",
               disable=not progress, dynamic_ncols=True)
    log = _RunLog(Path(results_dir).name, len(planned), len(todo), jobs)
    try:
        if jobs == 1 or len(todo) <= 1:
            for i in todo:
                bar.set_postfix_str(planned[i][0].run_id)
                results[i] = _execute(planned[i][0], actions[i][0], keep_checkpoint=False)
                if results[i].status != "interrupted":
                    log.finished(planned[i][0], results[i])
                    bar.update(1)
                _reraise_interrupt(results[i])
        else:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                                     initializer=_start_worker) as pool:
                futures = {pool.submit(_execute, planned[i][0], actions[i][0], threads, False, True): i
                           for i in todo}
                try:
                    for future in as_completed(futures):
                        i = futures[future]
                        results[i] = future.result()
                        if results[i] is not None and results[i].status != "interrupted":
                            log.finished(planned[i][0], results[i])
                            bar.set_postfix_str(planned[i][0].run_id)
                            bar.update(1)
                        if results[i] is None or results[i].signal is not None:  # a signal reached a worker
                            pool.shutdown(wait=True, cancel_futures=True)  # start no new run
                            break
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
            for result in results:
                if result is not None:
                    _reraise_interrupt(result)
            if any(result is None for result in results):
                raise RuntimeError("stopped by a signal before every run was trained; continue with mode='resume'")
    finally:
        bar.close()
    return pd.DataFrame([_summary_row(r.run_dir, r.summary, cfg, tag) for r, (cfg, tag) in zip(results, planned)])


def _summary_row(run_dir: Path, summary: dict[str, Any], cfg: TrainConfig, tag: str | None) -> dict[str, Any]:
    final = summary.get("final_val_loss")
    if summary["status"] != "completed" or final is None or not math.isfinite(final):
        final = math.inf
    return {
        "run_id": run_dir.name, "optimizer": cfg.optimizer, "tag": tag or "", "lr": cfg.lr, "seed": cfg.seed,
        "hparams": json.dumps(cfg.hparams, sort_keys=True), "status": summary["status"],
        "final_val_loss": final, "final_val_ppl": math.exp(final) if math.isfinite(final) else math.inf,
        "tokens": summary.get("tokens"), "tokens_per_s": summary.get("tokens_per_s"),
        "wall_s": summary.get("wall_s"), "optimizer_state_bytes": summary.get("optimizer_state_bytes"),
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
    }


def load_runs(results_dir: str | Path) -> pd.DataFrame:
    """The summary table of every finished run folder under `results_dir` (the same columns as `run_grid`)."""
    rows = []
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for config_path in sorted(Path(results_dir).glob("*/config.json")):
        config, summary = _recorded(config_path.parent)
        if summary is None:
            continue
        cfg = TrainConfig(**{k: v for k, v in config.items() if k in fields})
        rows.append(_summary_row(config_path.parent, summary, cfg, _tag_from_run_id(config_path.parent.name, cfg)))
    return pd.DataFrame(rows)


def _tag_from_run_id(name: str, cfg: TrainConfig) -> str | None:
    marker = f"-lr{cfg.lr:g}-seed{cfg.seed}"
    label = name[:name.rfind(marker)] if marker in name else None
    return label if label and label != cfg.optimizer else None


def load_curves(results_dir: str | Path, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Long table of validation curves: run_id, step, tokens, val_loss, val_ppl (evaluation rows only)."""
    frames = []
    dirs = [Path(results_dir) / r for r in run_ids] if run_ids is not None else sorted(Path(results_dir).glob("*/"))
    for run_dir in dirs:
        rows = [r for r in read_metrics(run_dir) if r.get("val_loss") is not None]
        if rows:
            frame = pd.DataFrame(rows)[["step", "tokens", "val_loss", "val_ppl"]]
            frame.insert(0, "run_id", run_dir.name)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["run_id", "step", "tokens", "val_loss", "val_ppl"])


def best_lr(table: pd.DataFrame, by: Iterable[str] = ("optimizer", "tag")) -> pd.DataFrame:
    """Per method, the lr with the lowest final validation loss (mean over seeds)."""
    by = list(by)
    mean = table.groupby([*by, "lr"], as_index=False)["final_val_loss"].mean()
    return mean.loc[mean.groupby(by)["final_val_loss"].idxmin()].reset_index(drop=True)
