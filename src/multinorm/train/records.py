"""The run folder: ``config.json`` (the run record), ``metrics.jsonl`` (one row per logged step, built by
:func:`metrics_row`), ``summary.json`` (how the run ended), and the checks made on a folder before a run
writes or resumes in it."""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multinorm import __version__
from multinorm.io import atomic_write
from multinorm.optim import optimizer_state_bytes

from .checkpoint import remove_sharded
from .config import ConfigError, TrainConfig

__all__ = ["RunResult", "read_metrics", "CODE_PATHS", "git_commit", "peak_memory_bytes", "metrics_row", "run_record",
           "write_summary", "prepare_run_dir", "config_dict", "check_resume_config"]


@dataclass
class RunResult:
    """What a run leaves behind: its folder and its final summary."""

    run_dir: Path
    summary: dict[str, Any]
    # The stop signal ("SIGINT"/"SIGTERM") the run received, if any: also set on a run that completed because
    # the signal came during its last step, so a caller running several runs in turn still stops.
    signal: str | None = None

    @property
    def status(self) -> str:
        return self.summary["status"]

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# What decides a run's numbers: "-dirty" marks uncommitted changes here. Results, figures and README are written
# by the studies themselves while a campaign runs, so changes there do not make the code dirty.
CODE_PATHS = ("src", "notebooks", "pyproject.toml")


def git_commit(root: Path | None = None) -> str | None:
    """The checkout's commit, with "-dirty" when its code (:data:`CODE_PATHS`) has uncommitted changes."""
    try:
        root = root or Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is the process high-water mark, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def metrics_row(step: int, tokens: int, train_loss: float | None, val_loss: float | None, lr: float,
                tokens_per_s: float | None, wall_s: float, optimizer: torch.optim.Optimizer,
                device: torch.device) -> dict[str, Any]:
    """One line of ``metrics.jsonl``: the step's numbers, the validation perplexity when it was evaluated, and
    the optimizer's state and the process's peak memory at that point."""
    return {"step": step, "tokens": tokens, "train_loss": train_loss, "val_loss": val_loss,
            "val_ppl": math.exp(val_loss) if val_loss is not None else None, "lr": lr,
            "tokens_per_s": tokens_per_s, "wall_s": wall_s, "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "peak_memory_bytes": peak_memory_bytes(device)}


def run_record(cfg: TrainConfig, steps: int, vocab_size: int, parameters: dict[str, int], device: torch.device,
               processes: dict[str, Any], optimizers: list[str]) -> dict[str, Any]:
    """``config.json``: every setting to re-run the run, and what it ran on (package version, git commit, torch,
    device, threads; ``processes`` adds the parallel layout of a run on several processes; ``optimizers`` the
    optimizer built, one line per part, with AdamW's implementation, from ``describe_optimizer``)."""
    return {
        "config": config_dict(cfg),
        "steps": steps, "tokens_per_step": cfg.tokens_per_step, "vocab_size": vocab_size,
        "parameters": parameters, "optimizers": optimizers, "multinorm_version": __version__, "git_commit": git_commit(),
        "torch_version": torch.__version__, "python": sys.version.split()[0],
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **processes,
    }


def write_summary(run_dir: Path, status: str, message: str | None, steps_done: int, steps: int, tokens: int,
                  optimizer: torch.optim.Optimizer, device: torch.device, **extra: Any) -> dict[str, Any]:
    """``summary.json`` from the metrics written so far: status, final and best validation loss, median
    tokens/s, wall time, optimizer state and peak memory (written atomically)."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if r.get("val_loss") is not None]
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    summary = {
        "status": status, "message": message, "run_id": run_dir.name, "steps_done": steps_done,
        "steps": steps, "tokens": tokens,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "final_val_ppl": evals[-1]["val_ppl"] if evals else None,
        "best_val_loss": min((r["val_loss"] for r in evals), default=None),
        "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
        "wall_s": rows[-1]["wall_s"] if rows else 0.0,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "peak_memory_bytes": peak_memory_bytes(device),
        **extra,
    }
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if (run_dir / "config.json").exists() and not resume:
        if not overwrite:
            raise ConfigError(f"run folder {run_dir} already exists; pass --resume to continue it, "
                              f"--overwrite to replace it, or choose another --run-id")
        for name in ("metrics.jsonl", "summary.json", "checkpoint.pt", "checkpoint.pt.tmp"):
            (run_dir / name).unlink(missing_ok=True)
        remove_sharded(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"results folder {run_dir} is not writable: {exc.strerror or exc}") from None


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.pop("progress")
    return json.loads(json.dumps(d))  # as recorded in config.json (tuples become lists)


# Settings a resumed run may change: they decide how and where the run is kept, not what it computes.
# The number of processes and their layout may change too: checkpoints reshard.
_RESUMABLE_CHANGES = {"checkpoint_interval", "save_checkpoint", "results_dir", "run_id", "cache_dir", "parallel"}


def check_resume_config(cfg: TrainConfig, run_dir: Path) -> None:
    config_path = run_dir / "config.json"
    if not config_path.exists():
        return
    old, new = json.loads(config_path.read_text())["config"], config_dict(cfg)
    changed = sorted(k for k in (set(old) | set(new)) - _RESUMABLE_CHANGES if old.get(k) != new.get(k))
    if changed:
        diffs = ", ".join(f"{k} (recorded {old.get(k)!r}, given {new.get(k)!r})" for k in changed)
        raise ConfigError(f"cannot resume {run_dir}: settings differ from the recorded run: {diffs}")
