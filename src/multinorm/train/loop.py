"""A run: data, model, optimizer and schedule built from a :class:`TrainConfig`, then the steps (forward,
backward, optimizer), evaluations, records and checkpoints, until the budget, a divergence or a stop signal."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from multinorm.data import load_data
from multinorm.io import atomic_write
from multinorm.llama import build_model, count_parameters
from multinorm.optim import build_optimizer, describe_optimizer
from multinorm.parallel import Parallel

from .checkpoint import read_checkpoint, remove_sharded, restore, save_sharded, save_single
from .config import DTYPES, ConfigError, TrainConfig, one_line
from .evaluation import evaluate
from .records import (RunResult, check_resume_config, metrics_row, prepare_run_dir, read_metrics, run_record,
                      write_summary)
from .signals import StopOnSignal

__all__ = ["build_scheduler", "train"]


def build_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_frac: float = 0.1,
                    min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over int(warmup_frac * steps) steps, then cosine decay to min_lr_ratio x peak."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup  # seconds to import: only when training

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(warmup_frac * steps), num_training_steps=steps, min_lr_rate=min_lr_ratio)


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


def _train(cfg: TrainConfig, par: Parallel, resume: bool, overwrite: bool) -> RunResult:
    run_dir = Path(cfg.results_dir) / (cfg.run_id or cfg.default_run_id())
    if resume:
        check_resume_config(cfg, run_dir)
    par.on_main(lambda: prepare_run_dir(run_dir, resume, overwrite))
    metrics_path, ckpt_path = run_dir / "metrics.jsonl", run_dir / "checkpoint.pt"
    ckpt, ckpt_folder = None, None
    if resume:  # a missing or damaged checkpoint fails before any work
        ckpt, ckpt_folder = read_checkpoint(run_dir)

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
        optimizer = build_optimizer(par.unwrap(model), cfg.optimizer, cfg.lr, replica_group=par.replica_group(),
                                    **cfg.hparams)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    steps = cfg.steps
    scheduler = build_scheduler(optimizer, steps, cfg.warmup_frac, cfg.min_lr_ratio)

    start_step, tokens_seen, wall_offset = 0, 0, 0.0
    # The train loss logged every log_interval steps is a mean over the steps since the last line; the
    # checkpoint keeps that running sum so a resume between two lines logs the same mean.
    window_loss, window_n = 0.0, 0
    if ckpt is not None:
        try:
            restore(model, optimizer, ckpt, ckpt_folder, par)
        except (RuntimeError, ValueError, KeyError) as exc:
            where = ckpt_folder or ckpt_path
            raise ConfigError(f"cannot resume: checkpoint {where} does not fit this model and optimizer "
                              f"({one_line(exc)})") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        start_step, tokens_seen, wall_offset = ckpt["step"], ckpt.get("tokens", 0), ckpt.get("wall_s", 0.0)
        window_loss, window_n = ckpt.get("train_loss_window", (0.0, 0))
        # Drop lines logged after the checkpoint: they are about to be recomputed.
        kept = [m for m in read_metrics(run_dir) if m["step"] <= start_step]
        par.on_main(lambda: atomic_write(metrics_path, "".join(json.dumps(m) + "\n" for m in kept)))
    else:
        record = run_record(cfg, steps, data.vocab_size, params, device,
                            {"parallel": par.mode, "processes": par.world} if par.distributed else {},
                            describe_optimizer(optimizer))

        def write_record() -> None:
            (run_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
            metrics_path.write_text("")

        par.on_main(write_record)

    def log(entry: dict[str, Any]) -> None:
        if par.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def summarize(status: str, message: str | None = None, **extra: Any) -> dict[str, Any]:
        if not par.is_main:  # rank 0 keeps the record; the others only report how the run ended
            return {"status": status, "message": message, "steps_done": step, "steps": steps, **extra}
        return write_summary(run_dir, status, message, step, steps, tokens_seen, optimizer, device, **extra)

    def save_checkpoint() -> None:
        state = {"scheduler": scheduler.state_dict(), "step": step, "tokens": tokens_seen, "wall_s": train_time,
                 "train_loss_window": (window_loss, window_n)}
        if par.distributed:
            save_sharded(run_dir, model, optimizer, state, par)
            par.on_main(lambda: ckpt_path.unlink(missing_ok=True))  # an older one, from one process
        else:
            save_single(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state})
            remove_sharded(run_dir)  # an older one, from several processes

    def validation_loss() -> float:
        return evaluate(par.unwrap(model), data, cfg.eval_batch_size, device, cfg.eval_mode, parallel=par)

    micro_bs = cfg.batch_size // (cfg.grad_accum * par.world)
    step = start_step
    train_time = wall_offset
    with StopOnSignal() as stop, tqdm(total=steps, initial=start_step, disable=not (cfg.progress and par.is_main),
                                       unit="step", desc=f"{cfg.optimizer} lr={cfg.lr:g}", dynamic_ncols=True) as bar:
        if step == 0:
            val_loss = validation_loss()
            log(metrics_row(0, 0, None, val_loss, optimizer.param_groups[0]["lr"], None, 0.0, optimizer, device))

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
                log(metrics_row(step + 1, tokens_seen, step_loss, None, optimizer.param_groups[0]["lr"], None,
                                train_time, optimizer, device))
                summary = summarize("diverged", message)
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
                log(metrics_row(step, tokens_seen, window_loss / window_n, val_loss, lr_now, rate, train_time,
                                optimizer, device))
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
                return RunResult(run_dir, summarize("interrupted", message, signal=name), signal=name)
    # A signal during the last step (or its evaluation) finds nothing left to stop: the run completes, and the
    # result still names the signal, so a caller with more runs to go stops.
    late = stop.signum
    return RunResult(run_dir, summarize("completed"), signal=signal.Signals(late).name if late else None)
