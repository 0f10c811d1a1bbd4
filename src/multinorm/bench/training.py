"""Training-step benchmark at ``nano``: tokens/s per optimizer (interleaved) and where a step's time goes.

The loop mirrors the trainer's step (:func:`multinorm.train.train`) with the same public pieces --
``load_data``, ``build_model``, ``build_optimizer`` -- and the regime of the convergence study (notebook 02):
batch 8 x 256 tokens, vocabulary 1024, a 65,536-token validation set evaluated every 64 steps. One step: fetch the batch,
forward, backward, read the loss (the trainer logs it every step), optimizer step, ``zero_grad``, LR
scheduler step. Every optimizer trains its own copy of the model (same seed) on the same batches.

Besides the whole step, every timed step records its optimizer phase (step, ``zero_grad``, scheduler): forward,
backward and evaluation are the same work whatever the optimizer, so at a size where they dominate the
step the tokens/s ratio is settled by noise, and the optimizer phase is the part an optimizer decides.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..llama import build_model
from ..optim import build_optimizer, describe_optimizer
from ..studies.stats import ratio_ci
from .measure import interleave, ratio_summary, threading_label

__all__ = ["TrainSetup", "make_loops", "train_throughput", "train_profile", "PHASES",
           "THROUGHPUT_COLUMNS", "PROFILE_COLUMNS"]

PHASES = ("data", "forward", "backward", "optimizer", "evaluation")
LABEL = "bench:"  # prefix of the profiler ranges, so no other range shares their names
_SETUP = ["model", "device", "dtype", "threads", "threading", "vocab_size", "batch_size", "seq_len", "optimizer"]
THROUGHPUT_COLUMNS = _SETUP + ["baseline", "rounds", "step_ms", "tokens_per_s", "tokens_per_s_min",
                               "tokens_per_s_max", "ratio", "ratio_min", "ratio_max", "ratio_low", "ratio_high",
                               "optimizer_ms", "optimizer_ratio", "optimizer_ratio_min", "optimizer_ratio_max", "built",
                               "baseline_built", "note"]
PROFILE_COLUMNS = _SETUP + ["phase", "ms_per_step", "fraction", "steps_profiled"]


@dataclass
class TrainSetup:
    model: str = "nano"
    dataset: str = "wiki-sample"
    vocab_size: int = 1024
    batch_size: int = 8
    seq_len: int = 256
    eval_tokens: int = 65_536
    eval_batch_size: int = 16
    eval_interval: int = 64
    lr: float = 1e-3
    seed: int = 0


@dataclass
class Loop:
    """One optimizer's training step and evaluation, each closing over its own model; ``optimizer_seconds``
    receives the wall time of every step's optimizer phase."""

    optimizer: str
    step: Callable[[], None]
    evaluate: Callable[[], None]
    optimizer_seconds: list[float] = field(default_factory=list)
    built: str = ""  # what build_optimizer made, e.g. "SinkGD: hidden; AdamW (fused): rest"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # so that each phase's range covers its GPU work
        torch.cuda.synchronize(device)


def make_loops(optimizers: Sequence[str], setup: TrainSetup, data, device: torch.device,
               dtype: torch.dtype) -> list[Loop]:
    """A model, optimizer and scheduler per optimizer name, and closures for one step and one evaluation."""
    loops = []
    for name in optimizers:
        model = build_model(setup.model, data.vocab_size, seed=setup.seed, device=device, dtype=dtype)
        model.train()
        opt = build_optimizer(model, name, setup.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        counter = itertools.count()
        phase_seconds: list[float] = []

        def step(model=model, opt=opt, sched=sched, counter=counter, phase_seconds=phase_seconds):
            with record_function(LABEL + "data"):
                ids, labels = data.train_batch(next(counter), setup.batch_size)
                ids, labels = ids.to(device), labels.to(device)
            with record_function(LABEL + "forward"):
                loss = model(input_ids=ids, labels=labels).loss
                _sync(device)
            with record_function(LABEL + "backward"):
                loss.backward()
                loss.detach().float().item()  # the trainer reads the loss every step
            with record_function(LABEL + "optimizer"):
                start = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                _sync(device)
                phase_seconds.append(time.perf_counter() - start)

        @torch.no_grad()
        def evaluate(model=model):
            with record_function(LABEL + "evaluation"):
                model.eval()
                for ids, labels in data.val_batches(setup.eval_batch_size):
                    model(input_ids=ids.to(device), labels=labels.to(device)).loss.float().item()
                model.train()

        loops.append(Loop(name, step, evaluate, phase_seconds, "; ".join(describe_optimizer(opt))))
    return loops


def _common(setup: TrainSetup, device: torch.device, dtype: torch.dtype) -> dict:
    return {"model": setup.model, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "threading": threading_label(torch.get_num_threads()),
            "vocab_size": setup.vocab_size, "batch_size": setup.batch_size,
            "seq_len": setup.seq_len}


def train_throughput(loops: Sequence[Loop], setup: TrainSetup, device: torch.device, dtype: torch.dtype,
                     rounds: int, min_run_time: float, baseline: str = "adamw") -> tuple[list[dict], pd.DataFrame]:
    """Tokens/s of each loop's training step, timed in alternation; ratios to ``baseline`` per round.

    Per loop: the median over rounds (``ratio``, with min and max) and the geometric mean's 95 % t interval
    (``ratio_low``, ``ratio_high``) of the per-round tokens/s ratios, and the same for the optimizer phase
    (``optimizer_ratio``: this loop's phase over the baseline's, median of the per-round medians). The
    returned times have a row per (round, loop): ``seconds`` per step and ``optimizer_seconds`` per phase."""
    frames = []
    for r in range(rounds):
        seen = {loop.optimizer: len(loop.optimizer_seconds) for loop in loops}
        times = interleave({loop.optimizer: loop.step for loop in loops}, 1, min_run_time).assign(round=r)
        # the phases of this round's calls (its untimed warm-up call included: a median ignores it)
        phase = {loop.optimizer: float(np.median(loop.optimizer_seconds[seen[loop.optimizer]:])) for loop in loops}
        frames.append(times.assign(optimizer_seconds=times["name"].map(phase)))
    times = pd.concat(frames, ignore_index=True)
    tokens = setup.batch_size * setup.seq_len
    wide = times.pivot(index="round", columns="name", values="seconds")
    phase_times = times.drop(columns="seconds").rename(columns={"optimizer_seconds": "seconds"})
    phases = phase_times.pivot(index="round", columns="name", values="seconds")
    built = {loop.optimizer: loop.built for loop in loops}
    rows = []
    for loop in loops:
        s = wide[loop.optimizer]
        rate = tokens / s
        row = {**_common(setup, device, dtype), "optimizer": loop.optimizer, "baseline": baseline, "rounds": rounds,
               "step_ms": float(s.median() * 1e3), "tokens_per_s": float(rate.median()),
               "tokens_per_s_min": float(rate.min()), "tokens_per_s_max": float(rate.max()),
               "optimizer_ms": float(phases[loop.optimizer].median() * 1e3), "built": loop.built,
               "baseline_built": built.get(baseline, ""), "note": ""}
        if baseline in wide:
            # tokens/s ratio = baseline step time / this step time, within each round
            row.update(ratio_summary(times, baseline, loop.optimizer))
            interval = ratio_ci((wide[baseline] / s).to_numpy(float))
            row.update(ratio_low=interval.low, ratio_high=interval.high)
            # optimizer phase ratio = this phase / the baseline's, within each round
            row.update({f"optimizer_{k}": v for k, v in ratio_summary(phase_times, loop.optimizer, baseline).items()})
        rows.append(row)
    return rows, times


def train_profile(loops: Sequence[Loop], setup: TrainSetup, device: torch.device, dtype: torch.dtype,
                  steps: int) -> list[dict]:
    """Per loop: ``steps`` steps and one evaluation under ``torch.profiler`` (after the warm-up that
    the throughput measurement gave). Evaluation is amortized over ``setup.eval_interval`` steps;
    ``other`` is the part of a step outside the labelled phases (Python, scheduler bookkeeping)."""
    rows = []
    for loop in loops:
        loop.step()  # warm-up, in case no throughput measurement ran before
        loop.evaluate()
        # CPU activity only: every phase ends with a CUDA sync, so its range's wall time covers its GPU work
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function(LABEL + "step"):
                    loop.step()
            loop.evaluate()
        # cpu_time_total of a record_function range is the wall time spent inside it, in microseconds
        total = {e.key.removeprefix(LABEL): e.cpu_time_total / 1e3 for e in prof.key_averages()
                 if e.key.startswith(LABEL)}
        step_ms = total["step"] / steps
        ms = {phase: total.get(phase, 0.0) / steps for phase in PHASES if phase != "evaluation"}
        ms["other"] = max(step_ms - sum(ms.values()), 0.0)
        ms["evaluation"] = total.get("evaluation", 0.0) / setup.eval_interval
        whole = step_ms + ms["evaluation"]
        for phase in (*PHASES, "other"):
            rows.append({**_common(setup, device, dtype), "optimizer": loop.optimizer, "phase": phase,
                         "ms_per_step": ms[phase], "fraction": ms[phase] / whole, "steps_profiled": steps})
    return rows
