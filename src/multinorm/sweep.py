"""Grids of training runs for the studies: run them (reusing finished ones on request) and tabulate.

A study is a list of overrides of one base `TrainConfig`; each run lands in
`results/runs/<study>/<run-id>/` like any CLI run, so a notebook's table can always be rebuilt from
the run folders alone (`load_runs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from tqdm.auto import tqdm

from multinorm.train import RunResult, TrainConfig, read_metrics, train

__all__ = ["run_id", "train_or_reuse", "run_grid", "load_runs", "load_curves", "best_lr"]

# Settings that change how a run is kept, not what it computes.
_BOOKKEEPING = {"save_checkpoint", "checkpoint_interval", "progress"}
# A run that ended with one of these is a result; an interrupted one is not.
_FINISHED = {"completed", "diverged"}


def run_id(optimizer: str, lr: float, seed: int, tag: str | None = None) -> str:
    """Folder name of one run of a study: <tag or optimizer>-lr<lr>-seed<seed>."""
    return f"{tag or optimizer}-lr{lr:g}-seed{seed}"


def _same_run(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a recorded config computes the same run as `new` (bookkeeping settings aside)."""
    keys = (set(old) | set(new)) - _BOOKKEEPING
    return all(k in old and k in new and old[k] == new[k] for k in keys)


def _finished_run(cfg: TrainConfig) -> RunResult | None:
    """The finished run of `cfg` already in its folder, if there is one with the same config."""
    run_dir = Path(cfg.results_dir) / (cfg.run_id or cfg.default_run_id())
    config_path, summary_path = run_dir / "config.json", run_dir / "summary.json"
    if not (config_path.exists() and summary_path.exists()):
        return None
    summary = json.loads(summary_path.read_text())
    # Compare as recorded in config.json, where tuples are lists.
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if summary.get("status") in _FINISHED and _same_run(json.loads(config_path.read_text())["config"], new):
        return RunResult(run_dir, summary)
    return None


def train_or_reuse(cfg: TrainConfig, *, reuse: bool = False) -> RunResult:
    """Train `cfg` into its run folder, replacing what is there; with `reuse`, return the finished run
    already there instead when it was trained with the same config.

    A run stopped by SIGINT/SIGTERM re-raises that signal once `train` has saved its state, so a
    Ctrl-C stops the whole study, not just its current run.
    """
    if reuse and (finished := _finished_run(cfg)) is not None:
        return finished
    result = train(cfg, overwrite=True)
    if result.status == "interrupted":
        signal.raise_signal(signal.Signals[result.summary["signal"]])
    return result


def run_grid(base: TrainConfig, grid: Iterable[dict[str, Any]], results_dir: str | Path, *,
             reuse: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run every override in `grid` on top of `base`; return one summary row per run.

    Each override may set any `TrainConfig` field plus `tag` (a label kept in the table and in the
    run id, e.g. an ablation name). With `reuse`, runs whose folder already holds a finished run
    with the same config are read back instead of trained again (see `train_or_reuse`). Diverged runs stay in the table
    with `status == "diverged"` and an infinite final loss, so a sweep never dies on a bad lr.
    """
    grid = list(grid)
    rows = []
    outer = tqdm(grid, desc=Path(results_dir).name, unit="run", disable=not progress, dynamic_ncols=True)
    for override in outer:
        override = dict(override)
        tag = override.pop("tag", None)
        # Study runs are read back from their metrics, never resumed: no multi-megabyte checkpoints.
        override.setdefault("save_checkpoint", False)
        cfg = dataclasses.replace(base, **override, results_dir=str(results_dir), progress=False)
        cfg.run_id = cfg.run_id or run_id(cfg.optimizer, cfg.lr, cfg.seed, tag)
        outer.set_postfix_str(cfg.run_id)
        result = train_or_reuse(cfg, reuse=reuse)
        rows.append(_summary_row(result.run_dir, result.summary, cfg, tag))
    return pd.DataFrame(rows)


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
    """The summary table of every run folder under `results_dir` (the same columns as `run_grid`)."""
    rows = []
    for config_path in sorted(Path(results_dir).glob("*/config.json")):
        run_dir = config_path.parent
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            continue
        record = json.loads(config_path.read_text())["config"]
        cfg = TrainConfig(**{k: v for k, v in record.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
        tag = _tag_from_run_id(run_dir.name, cfg)
        rows.append(_summary_row(run_dir, json.loads(summary_path.read_text()), cfg, tag))
    return pd.DataFrame(rows)


def _tag_from_run_id(name: str, cfg: TrainConfig) -> str | None:
    suffix = f"-lr{cfg.lr:g}-seed{cfg.seed}"
    label = name[:-len(suffix)] if name.endswith(suffix) else None
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
