"""The training loop, its run records and checkpoints, and the CLI (`python -m multinorm.train`).

One run = one folder `results/runs/<run-id>/`:

    config.json      every setting needed to re-run, plus package version, git commit, torch, device
    metrics.jsonl    one line per logged step: step, tokens, train_loss, val_loss, val_ppl, lr,
                     tokens_per_s, wall_s, optimizer_state_bytes, peak_memory_bytes
    summary.json     final status ("completed" / "diverged" / "interrupted"), final validation loss/ppl, throughput
    checkpoint.pt    model + optimizer + scheduler + step (git-ignored), for `--resume`
    checkpoint.dcp/  the same, written by a run on several processes (`multinorm.distributed_checkpoint`)

Schedule (the GaLore benchmark's): linear warm-up from 0 over the first 10 % of steps, then cosine
decay to 10 % of the peak learning rate (transformers' cosine-with-min-lr schedule).

Ctrl-C (SIGINT) or SIGTERM stops the run cleanly: the current step finishes, a checkpoint is written,
the summary says "interrupted", and the CLI exits with 128 + the signal number (130 / 143). A second
signal aborts at once; the last checkpoint is still intact, as every checkpoint is written atomically.
A signal during the last step lets the run complete (`RunResult.signal` still names it, so a study stops).
On CPU a resumed run reproduces the uninterrupted run's metrics exactly: batches are a pure function
of (seed, step), and the checkpoint holds all state.

Several processes (`torchrun --nproc-per-node N -m multinorm.train ... --parallel ddp|fsdp`, see
`multinorm.parallel`): `--batch-size` stays the sequences per optimizer step over all ranks, each rank
taking an equal share of every step's batch, so an N-rank run trains on the batches of the 1-process run.
Every micro-batch's mean loss weighs the same (as with gradient accumulation), so the N-rank step equals
the 1-process step with N times the gradient-accumulation micro-batches -- and the 1-process step with the
same flags when every sequence has the same number of predicted tokens (packed data: wiki-sample, local).
Rank 0 alone writes the run record; validation is split across the ranks and summed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from multinorm import __version__
from multinorm import distributed_checkpoint
from multinorm.data import DATASETS, load_data
from multinorm.io import atomic_write, parse_assignment
from multinorm.llama import MODEL_CONFIGS, build_model, count_parameters
from multinorm.optim import OPTIMIZERS, build_optimizer, optimizer_state_bytes
from multinorm.parallel import MODES, Parallel, launch_rank

__all__ = ["TrainConfig", "RunResult", "ConfigError", "train", "build_scheduler", "evaluate", "load_checkpoint",
           "read_metrics", "main"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ConfigError(ValueError):
    """A bad setting, reported as one line by the CLI."""


@dataclass
class TrainConfig:
    """Everything that defines a run. Field names are the CLI flags with '-' for '_'."""

    model: str = "nano"
    dataset: str = "wiki-sample"
    data_files: str | None = None
    vocab_size: int = 4096
    seq_len: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    hparams: dict[str, Any] = field(default_factory=dict)
    tokens: int = 2_000_000
    batch_size: int = 16
    grad_accum: int = 1
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    eval_interval: int = 50
    eval_tokens: int | None = 131_072
    eval_batch_size: int = 16
    eval_mode: str = "exact"
    log_interval: int = 10
    checkpoint_interval: int = 0
    save_checkpoint: bool = True
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    results_dir: str = "results/runs"
    run_id: str | None = None
    cache_dir: str | None = None
    progress: bool = True
    parallel: str | None = None

    def __post_init__(self) -> None:
        # A learning rate computed with numpy or pandas (a grid times a tuned lr) is a numpy scalar; it would
        # reach the optimizer's param_groups and make every checkpoint refuse to load with weights_only=True.
        self.lr = _plain(self.lr)
        self.hparams = {key: _plain(value) for key, value in self.hparams.items()}

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if self.device.startswith("cuda") else "fp32"

    def default_run_id(self) -> str:
        return f"{self.model}-{self.dataset}-{self.optimizer}-lr{self.lr:g}-seed{self.seed}"

    def validate(self) -> None:
        """Reject bad settings before any work is done, with a message that names the fix."""
        if self.model not in MODEL_CONFIGS:
            raise ConfigError(f"unknown model {self.model!r}; valid models: {', '.join(MODEL_CONFIGS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(DATASETS)}")
        max_pos = MODEL_CONFIGS[self.model].max_position_embeddings
        if not 1 <= self.seq_len <= max_pos:
            raise ConfigError(f"seq_len {self.seq_len} is outside 1..{max_pos}, the positions of model {self.model!r}")
        if not _finite_nonnegative(self.lr):
            raise ConfigError(f"lr must be a finite number >= 0, got {self.lr}")
        adam_lr = self.hparams.get("adam_lr")
        if adam_lr is not None and not _finite_nonnegative(adam_lr):
            raise ConfigError(f"adam_lr must be a finite number >= 0, got {adam_lr!r}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a positive multiple of grad_accum ({self.grad_accum})")
        if self.steps < 1:
            raise ConfigError(f"token budget {self.tokens:,} is smaller than one step "
                              f"({self.batch_size} x {self.seq_len} = {self.tokens_per_step:,} tokens)")
        if self.eval_interval < 1 or self.log_interval < 1 or self.checkpoint_interval < 0:
            raise ConfigError("eval_interval and log_interval must be >= 1, checkpoint_interval >= 0")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("warmup_frac must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.eval_mode not in ("exact", "galore_compat"):
            raise ConfigError(f"eval_mode must be 'exact' or 'galore_compat', got {self.eval_mode!r}")
        if self.resolved_dtype() not in DTYPES:
            raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        if self.parallel is not None and self.parallel not in MODES:
            raise ConfigError(f"unknown parallel mode {self.parallel!r}; valid: {', '.join(MODES)}")
        if self.parallel == "fsdp" and not OPTIMIZERS[self.optimizer].sharded:
            supported = ", ".join(name for name, spec in OPTIMIZERS.items() if spec.sharded)
            raise ConfigError(f"{self.optimizer} is not supported on FSDP2-sharded parameters (supported: "
                              f"{supported}); use --parallel ddp")


def _finite_nonnegative(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


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


def build_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_frac: float = 0.1,
                    min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over int(warmup_frac * steps) steps, then cosine decay to min_lr_ratio x peak."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup  # seconds to import: only when training

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(warmup_frac * steps), num_training_steps=steps, min_lr_rate=min_lr_ratio)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# What decides a run's numbers: "-dirty" marks uncommitted changes here. Results, figures and README are written
# by the studies themselves while a campaign runs, so changes there do not make the code dirty.
CODE_PATHS = ("src", "notebooks", "pyproject.toml")


def _git_commit(root: Path | None = None) -> str | None:
    """The checkout's commit, with "-dirty" when its code (:data:`CODE_PATHS`) has uncommitted changes."""
    try:
        root = root or Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is the process high-water mark, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, batch_size: int, device: torch.device, mode: str = "exact",
             parallel: Parallel | None = None) -> float:
    """Mean validation loss per predicted token on the fixed validation set.

    `mode="galore_compat"` reproduces the GaLore evaluator's quirk (docs/benchmark.md#the-galore-evaluator-quirk): the mean of
    per-batch mean losses divided by n + 1 for n batches, which biases the perplexity low.
    With `parallel` (several ranks) rank r evaluates batches r, r + N, ... and the sums are added up over
    the ranks: the same batches and the same result as one process. Under FSDP2 a forward pass is a
    collective, so a rank left without a batch in the last round runs one more forward and ignores it.
    """
    par = parallel or Parallel()
    was_training = model.training
    model.eval()
    total_loss, total_count, batch_losses = 0.0, 0, []
    batches = data.val_batches(batch_size)
    if par.distributed:
        batches = list(batches)
        rounds = -(-len(batches) // par.world)
        spare = batches[:1] * (rounds - len(batches[par.rank::par.world])) if par.mode == "fsdp" else []
        for input_ids, _ in spare:
            model(input_ids=input_ids.to(device))
        batches = batches[par.rank::par.world]
    for input_ids, labels in batches:
        input_ids, labels = input_ids.to(device), labels.to(device)
        loss = model(input_ids=input_ids, labels=labels).loss.float().item()
        count = int((labels[:, 1:] != -100).sum())
        total_loss += loss * count
        total_count += count
        batch_losses.append(loss)
    model.train(was_training)
    batch_sum, n_batches = sum(batch_losses), len(batch_losses)
    if par.distributed:
        total_loss, total_count, batch_sum, n_batches = par.sum([total_loss, total_count, batch_sum, n_batches])
    if total_count == 0:
        raise ValueError("the validation set is empty")
    if mode == "galore_compat":
        return batch_sum / (n_batches + 1)
    return total_loss / total_count


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))  # a crash mid-save leaves the previous checkpoint


# Classes that GaLore, APOLLO and Fira keep in their optimizer state, one projector per matrix: plain
# holders of a rank, a gap, a scale and an orthogonal-matrix tensor. Listed by name so that a resume
# imports only the package its checkpoint needs (importing all three takes seconds).
_PROJECTOR_CLASSES = (
    "galore_torch.galore_projector.GaLoreProjector",
    "apollo_torch.random_projector.GradientProjector",
    "apollo_torch.svd_projector.GaLoreProjector",
    "fira.gradient_projection.GradientProjector",
)


# numpy scalars: a learning rate that came from numpy, in checkpoints written before TrainConfig turned
# such values into Python numbers. Rebuilding one runs no code beyond numpy's own.
_NUMPY_SCALAR = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")


def _numpy_scalar_types() -> list[Any]:
    """What unpickling a numpy scalar touches: its reconstructor, np.dtype and the concrete dtype classes
    (the last are not listed by get_unsafe_globals_in_checkpoint, so all of them are allowed)."""
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [np._core.multiarray.scalar, np.dtype, *dtype_classes]


def _allowed_classes(path: Path) -> list[Any]:
    """The projector classes and numpy scalar types that the checkpoint at `path` refers to, imported."""
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    classes = []
    for name in sorted(unsafe & set(_PROJECTOR_CLASSES)):
        module, _, qualname = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), qualname))
    if unsafe & set(_NUMPY_SCALAR):
        classes += _numpy_scalar_types()
    return classes


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a run's checkpoint.pt safely: tensors, plain containers and the projector classes only.

    Raises ConfigError with a one-line message if the file is missing, truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_allowed_classes(path)):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on a damaged file
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = (f"it holds an object of a type that is not allowed to load ({unsafe.group(1)})" if unsafe
               else f"the file is corrupt or truncated ({_one_line(exc)})")
        raise ConfigError(f"checkpoint {path} cannot be loaded: {why}") from None
    missing = {"model", "optimizer", "scheduler", "step"} - (set(ckpt) if isinstance(ckpt, dict) else set())
    if missing:
        raise ConfigError(f"{path} is not a training checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _one_line(exc: Exception) -> str:
    """An exception as one short line: torch's loading errors can span many lines of advice."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "").split(". ")[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if (run_dir / "config.json").exists() and not resume:
        if not overwrite:
            raise ConfigError(f"run folder {run_dir} already exists; pass --resume to continue it, "
                              f"--overwrite to replace it, or choose another --run-id")
        for name in ("metrics.jsonl", "summary.json", "checkpoint.pt", "checkpoint.pt.tmp"):
            (run_dir / name).unlink(missing_ok=True)
        distributed_checkpoint.remove(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"results folder {run_dir} is not writable: {exc.strerror or exc}") from None


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.pop("progress")
    return json.loads(json.dumps(d))  # as recorded in config.json (tuples become lists)


# Settings a resumed run may change: they decide how and where the run is kept, not what it computes.
# The number of processes and their layout may change too: checkpoints reshard.
_RESUMABLE_CHANGES = {"checkpoint_interval", "save_checkpoint", "results_dir", "run_id", "cache_dir", "parallel"}


def _check_resume_config(cfg: TrainConfig, run_dir: Path) -> None:
    config_path = run_dir / "config.json"
    if not config_path.exists():
        return
    old, new = json.loads(config_path.read_text())["config"], _config_dict(cfg)
    changed = sorted(k for k in (set(old) | set(new)) - _RESUMABLE_CHANGES if old.get(k) != new.get(k))
    if changed:
        diffs = ", ".join(f"{k} (recorded {old.get(k)!r}, given {new.get(k)!r})" for k in changed)
        raise ConfigError(f"cannot resume {run_dir}: settings differ from the recorded run: {diffs}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalLatch:
    """A SIGINT/SIGTERM handler that only remembers the signal, for a process that trains several runs in turn
    (a study's worker): a signal that arrives between two runs, or during a run's last step, is kept, and
    `train` started while the latch holds a signal stops after its first step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def install(self) -> SignalLatch:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self)
        return self


class _StopOnSignal:
    """Turns SIGINT/SIGTERM into a request to stop after the current step; restores the old handlers on exit.

    Handlers are only installed from the main thread (Python delivers signals there), and a signal the
    process already ignores (nohup, background jobs) stays ignored. A `SignalLatch` in place shares its
    signal both ways: one it holds stops this run, one this run received is left in it.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        for latch in self._latches():
            self.signum = self.signum or latch.signum
        return self

    def _latches(self) -> list[SignalLatch]:
        return [h for h in self._previous.values() if isinstance(h, SignalLatch)]

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: stop now (the last checkpoint is intact)
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another write to the same stream.
        os.write(2, f"\n{signal.Signals(signum).name} received: stopping after this step "
                    f"(send it again to stop at once)\n".encode())

    def __exit__(self, *exc_info) -> None:
        for latch in self._latches():
            latch.signum = latch.signum or self.signum
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train `cfg.model` on `cfg.dataset` with `cfg.optimizer`; write the run record; return its summary.

    resume: continue the run in the folder from its checkpoint (the settings must match the recorded ones).
    overwrite: replace a run already in the folder (otherwise that is an error).
    A NaN/Inf loss ends the run with status "diverged"; everything logged up to then is kept. SIGINT or
    SIGTERM ends it with status "interrupted" after the current step and a checkpoint (if enabled); the
    summary then names the signal (`summary["signal"]`, e.g. "SIGTERM").
    Under torchrun every rank calls it (see the module docstring); it joins the process group and leaves
    it on return. A signal received by any rank stops all of them after the same step.
    """
    cfg.validate()
    try:
        par = Parallel.plan(cfg.parallel, cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if par.world > 1 and cfg.batch_size % (par.world * cfg.grad_accum):
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of processes x grad_accum "
                          f"({par.world} x {cfg.grad_accum}): each rank takes an equal share of every step's batch")
    par.start()
    try:
        return _train(cfg, par, resume, overwrite)
    finally:
        par.stop()


def _read_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """The run's newest checkpoint: (its contents -- for a distributed checkpoint, the trainer state only --,
    the distributed checkpoint's folder or None). ConfigError if there is none or it cannot be read."""
    single = run_dir / "checkpoint.pt"
    folder = distributed_checkpoint.find(run_dir)
    try:
        if folder is None:
            return load_checkpoint(single), None
        try:
            state = distributed_checkpoint.read_trainer_state(folder)
        except Exception as exc:  # torch raises many kinds on a damaged file
            raise ConfigError(f"checkpoint {folder} cannot be loaded ({_one_line(exc)})") from None
        if single.exists():  # both formats: the process stopped between writing one and deleting the other
            ckpt = load_checkpoint(single)
            if ckpt["step"] > state["step"]:
                return ckpt, None
        return state, folder
    except ConfigError as exc:
        raise ConfigError(f"cannot resume: {exc}") from None


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any], folder: Path | None,
             par: Parallel) -> None:
    """Model and optimizer state from a checkpoint of any layout into this one."""
    if folder is not None:
        distributed_checkpoint.load(folder, model, optimizer)
    elif par.distributed:
        distributed_checkpoint.load_full(model, optimizer, ckpt)
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])


def _train(cfg: TrainConfig, par: Parallel, resume: bool, overwrite: bool) -> RunResult:
    run_dir = Path(cfg.results_dir) / (cfg.run_id or cfg.default_run_id())
    if resume:
        _check_resume_config(cfg, run_dir)
    par.on_main(lambda: _prepare_run_dir(run_dir, resume, overwrite))
    metrics_path, ckpt_path = run_dir / "metrics.jsonl", run_dir / "checkpoint.pt"
    ckpt, ckpt_folder = None, None
    if resume:  # a missing or damaged checkpoint fails before any work
        ckpt, ckpt_folder = _read_checkpoint(run_dir)

    device = par.device
    dtype = DTYPES[cfg.resolved_dtype()]
    try:  # rank 0 first: it builds a missing data cache, which the other ranks then read
        data = par.main_first(lambda: load_data(
            cfg.dataset, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=cfg.seed, data_files=cfg.data_files,
            cache_dir=cfg.cache_dir, val_tokens=cfg.eval_tokens))
    except (ValueError, OSError, RuntimeError) as exc:  # bad files, checksum, failed download
        raise ConfigError(f"dataset {cfg.dataset!r}: {exc}") from None
    model = build_model(cfg.model, data.vocab_size, seed=cfg.seed, device=device, dtype=dtype)
    model.train()
    params = count_parameters(model)
    model = par.wrap(model)
    try:
        optimizer = build_optimizer(par.unwrap(model), cfg.optimizer, cfg.lr, **cfg.hparams)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    par.prepare_optimizer(optimizer)
    steps = cfg.steps
    scheduler = build_scheduler(optimizer, steps, cfg.warmup_frac, cfg.min_lr_ratio)

    start_step, tokens_seen, wall_offset = 0, 0, 0.0
    # The train loss logged every log_interval steps is a mean over the steps since the last line; the
    # checkpoint keeps that running sum so a resume between two lines logs the same mean.
    window_loss, window_n = 0.0, 0
    if ckpt is not None:
        try:
            _restore(model, optimizer, ckpt, ckpt_folder, par)
        except (RuntimeError, ValueError, KeyError) as exc:
            where = ckpt_folder or ckpt_path
            raise ConfigError(f"cannot resume: checkpoint {where} does not fit this model and optimizer "
                              f"({_one_line(exc)})") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        start_step, tokens_seen, wall_offset = ckpt["step"], ckpt.get("tokens", 0), ckpt.get("wall_s", 0.0)
        window_loss, window_n = ckpt.get("train_loss_window", (0.0, 0))
        # Drop lines logged after the checkpoint: they are about to be recomputed.
        kept = [m for m in read_metrics(run_dir) if m["step"] <= start_step]
        par.on_main(lambda: atomic_write(metrics_path, "".join(json.dumps(m) + "\n" for m in kept)))
    else:
        record = {
            "config": _config_dict(cfg),
            "steps": steps, "tokens_per_step": cfg.tokens_per_step, "vocab_size": data.vocab_size,
            "parameters": params, "multinorm_version": __version__, "git_commit": _git_commit(),
            "torch_version": torch.__version__, "python": sys.version.split()[0],
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"parallel": par.mode, "processes": par.world} if par.distributed else {}),
        }

        def write_record() -> None:
            (run_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
            metrics_path.write_text("")

        par.on_main(write_record)

    def log(entry: dict[str, Any]) -> None:
        if par.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def write_summary(status: str, message: str | None = None, **extra: Any) -> dict[str, Any]:
        if not par.is_main:  # rank 0 keeps the record; the others only report how the run ended
            return {"status": status, "message": message, "steps_done": step, "steps": steps, **extra}
        rows = read_metrics(run_dir)
        evals = [r for r in rows if r.get("val_loss") is not None]
        rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
        summary = {
            "status": status, "message": message, "run_id": run_dir.name, "steps_done": step,
            "steps": steps, "tokens": tokens_seen,
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "final_val_ppl": evals[-1]["val_ppl"] if evals else None,
            "best_val_loss": min((r["val_loss"] for r in evals), default=None),
            "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
            "wall_s": rows[-1]["wall_s"] if rows else 0.0,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "peak_memory_bytes": _peak_memory_bytes(device),
            **extra,
        }
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def save_checkpoint() -> None:
        state = {"scheduler": scheduler.state_dict(), "step": step, "tokens": tokens_seen, "wall_s": train_time,
                 "train_loss_window": (window_loss, window_n)}
        if par.distributed:
            distributed_checkpoint.save(run_dir, model, optimizer, state, par)
            par.on_main(lambda: ckpt_path.unlink(missing_ok=True))  # an older one, from one process
        else:
            _save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state})
            distributed_checkpoint.remove(run_dir)  # an older one, from several processes

    def validation_loss() -> float:
        return evaluate(par.unwrap(model), data, cfg.eval_batch_size, device, cfg.eval_mode, parallel=par)

    micro_bs = cfg.batch_size // (cfg.grad_accum * par.world)
    step = start_step
    train_time = wall_offset
    with _StopOnSignal() as stop, tqdm(total=steps, initial=start_step, disable=not (cfg.progress and par.is_main),
                                       unit="step", desc=f"{cfg.optimizer} lr={cfg.lr:g}", dynamic_ncols=True) as bar:
        if step == 0:
            val_loss = validation_loss()
            log({"step": 0, "tokens": 0, "train_loss": None, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
                 "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": None, "wall_s": 0.0,
                 "optimizer_state_bytes": optimizer_state_bytes(optimizer),
                 "peak_memory_bytes": _peak_memory_bytes(device)})

        window_tokens, window_time = 0, 0.0
        while step < steps:
            t0 = time.perf_counter()
            input_ids, labels = data.train_batch(step, cfg.batch_size, rows=par.rows(cfg.batch_size))
            chunks = list(zip(input_ids.split(micro_bs), labels.split(micro_bs)))
            step_loss = 0.0
            for i, (chunk_ids, chunk_labels) in enumerate(chunks):
                with par.accumulating(model, last=i == len(chunks) - 1):
                    loss = model(input_ids=chunk_ids.to(device), labels=chunk_labels.to(device)).loss
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.detach().float().item() / cfg.grad_accum
            # every rank takes the same decisions: on the mean loss, and on a signal any rank received
            step_loss, signum = par.agree(step_loss, stop.signum)
            if not math.isfinite(step_loss):
                message = (f"training loss became {step_loss} at step {step + 1}; run stopped "
                           f"(lr {cfg.lr:g} is likely too high)")
                log({"step": step + 1, "tokens": tokens_seen, "train_loss": step_loss, "val_loss": None,
                     "val_ppl": None, "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": None,
                     "wall_s": train_time, "optimizer_state_bytes": optimizer_state_bytes(optimizer),
                     "peak_memory_bytes": _peak_memory_bytes(device)})
                summary = write_summary("diverged", message)
                if par.is_main:
                    tqdm.write(f"error: {message}", file=sys.stderr)
                return RunResult(run_dir, summary)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_now = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            tokens_seen += cfg.tokens_per_step
            dt = time.perf_counter() - t0
            train_time += dt
            window_loss, window_n = window_loss + step_loss, window_n + 1
            window_tokens, window_time = window_tokens + cfg.tokens_per_step, window_time + dt
            bar.update(1)

            is_eval = step % cfg.eval_interval == 0 or step == steps
            if step % cfg.log_interval == 0 or is_eval:
                val_loss = validation_loss() if is_eval else None
                rate = window_tokens / window_time if window_time > 0 else None
                log({"step": step, "tokens": tokens_seen, "train_loss": window_loss / window_n, "val_loss": val_loss,
                     "val_ppl": math.exp(val_loss) if val_loss is not None else None, "lr": lr_now,
                     "tokens_per_s": rate, "wall_s": train_time,
                     "optimizer_state_bytes": optimizer_state_bytes(optimizer),
                     "peak_memory_bytes": _peak_memory_bytes(device)})
                bar.set_postfix(loss=f"{window_loss / window_n:.3f}", tok_s=f"{rate:,.0f}" if rate else "-")
                window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
            interrupted = signum is not None and step < steps
            periodic = cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0
            if cfg.save_checkpoint and (periodic or step == steps or interrupted):
                save_checkpoint()
            if interrupted:
                name = signal.Signals(signum).name
                kept = "checkpoint saved; resume to continue" if cfg.save_checkpoint else \
                    "no checkpoint (checkpoints are off), so it cannot be resumed"
                message = f"interrupted by {name} after step {step} of {steps}; {kept}"
                return RunResult(run_dir, write_summary("interrupted", message, signal=name), signal=name)
    # A signal during the last step (or its evaluation) finds nothing left to stop: the run completes, and the
    # result still names the signal, so a caller with more runs to go stops.
    late = stop.signum
    return RunResult(run_dir, write_summary("completed"), signal=signal.Signals(late).name if late else None)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m multinorm.train",
                                description="Pre-train a LLaMA model with a stateless or baseline optimizer; "
                                            "writes results/runs/<run-id>/.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help=f"model size: {', '.join(MODEL_CONFIGS)}")
    p.add_argument("--dataset", default=d.dataset, help=f"corpus: {', '.join(DATASETS)}")
    p.add_argument("--data-files", default=d.data_files, help="local text/json/parquet file(s) for --dataset local or c4")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary trained on the corpus (c4 uses t5-base's 32000)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    p.add_argument("--optimizer", default=d.optimizer, help=f"one of: {', '.join(OPTIMIZERS)}")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (of the hidden matrices for mixed optimizers)")
    p.add_argument("--hparam", action="append", type=parse_assignment, default=[], metavar="KEY=VALUE",
                   help="optimizer hyper-parameter, repeatable (e.g. --hparam iters=5 --hparam adam_lr=0.003)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="training token budget")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per optimizer step")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step (splits --batch-size)")
    p.add_argument("--warmup-frac", type=float, default=d.warmup_frac, help="linear warm-up fraction of the steps")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr as a fraction of the peak (cosine)")
    p.add_argument("--eval-interval", type=int, default=d.eval_interval, help="steps between validation evaluations")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="size of the fixed validation token set")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="sequences per validation batch")
    p.add_argument("--eval-mode", default=d.eval_mode, choices=["exact", "galore_compat"], help="validation loss averaging")
    p.add_argument("--log-interval", type=int, default=d.log_interval, help="steps between metric lines")
    p.add_argument("--checkpoint-interval", type=int, default=d.checkpoint_interval, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--no-checkpoint", action="store_true", help="save no checkpoint (the run cannot be resumed)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation and data order")
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", *DTYPES], help="auto: fp32 on CPU, bf16 on CUDA (as in the papers)")
    p.add_argument("--results-dir", default=d.results_dir, help="parent folder of run folders")
    p.add_argument("--run-id", default=None, help="run folder name (default: model-dataset-optimizer-lr-seed)")
    p.add_argument("--cache-dir", default=None, help="data cache folder (default: $MULTINORM_DATA or the repository's data/)")
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--parallel", default=None, choices=MODES,
                   help="under torchrun: ddp (a replica per rank; the default with several processes) or fsdp "
                        "(FSDP2: parameters sharded per decoder block); --batch-size stays the global batch")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(
        model=args.model, dataset=args.dataset, data_files=args.data_files, vocab_size=args.vocab_size,
        seq_len=args.seq_len, optimizer=args.optimizer, lr=args.lr, hparams=dict(args.hparam),
        tokens=args.tokens, batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_frac=args.warmup_frac,
        min_lr_ratio=args.min_lr_ratio, eval_interval=args.eval_interval, eval_tokens=args.eval_tokens,
        eval_batch_size=args.eval_batch_size, eval_mode=args.eval_mode, log_interval=args.log_interval,
        checkpoint_interval=args.checkpoint_interval, save_checkpoint=not args.no_checkpoint, seed=args.seed,
        device=args.device, dtype=args.dtype, results_dir=args.results_dir, run_id=args.run_id,
        cache_dir=args.cache_dir, progress=not args.no_progress, parallel=args.parallel)
    # Under torchrun every rank runs this; rank 0 alone reports.
    say = print if launch_rank() == 0 else (lambda *a, **k: None)
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as exc:
        say(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one while stopping
        say("error: aborted; if the run folder holds a checkpoint, continue with --resume", file=sys.stderr)
        return 128 + signal.SIGINT
    s = result.summary
    if s["status"] == "interrupted":
        if cfg.save_checkpoint:
            again = [a for a in argv if a != "--overwrite"] + ([] if args.resume else ["--resume"])
            launcher = "torchrun <the same options>" if "WORLD_SIZE" in os.environ else "python"
            hint = f"continue with: {launcher} -m multinorm.train {shlex.join(again)}"
        else:
            hint = "the run kept no checkpoint (--no-checkpoint) and cannot be resumed"
        say(f"interrupted by {s['signal']} after step {s['steps_done']} of {s['steps']}; {hint}", file=sys.stderr)
        return 128 + signal.Signals[s["signal"]]
    if s["status"] != "completed":
        say(f"error: {s['message']} (record kept in {result.run_dir})", file=sys.stderr)
        return 1
    if launch_rank() == 0:
        print(f"done: {result.run_dir}  final val loss {s['final_val_loss']:.4f}  ppl {s['final_val_ppl']:.2f}  "
              f"{s['tokens_per_s']:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
