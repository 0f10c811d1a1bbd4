"""How many runs to train at once on this machine's cores (`make figures JOBS=N`).

A study grid trains independent runs; with ``JOBS=N`` it trains N at a time, each with ``cores // N`` torch
threads (:mod:`multinorm.studies.sweep`). Small models use several threads poorly, so N runs of one thread may train
more tokens per second in total than one run of N threads. This measures it: for each N that divides the
cores, N processes start together, each trains ``steps`` AdamW steps of the studies' setup
(:class:`multinorm.bench.training.TrainSetup`) after two warm-up steps, and the tokens/s of all N are summed.
Each process reports its own rate over its own timed steps, so process start-up and imports are not counted.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from multiprocessing import get_context

import torch

from .training import TrainSetup, make_loops

__all__ = ["JOBS_COLUMNS", "job_counts", "run_steps", "jobs_throughput"]

JOBS_COLUMNS = ["model", "vocab_size", "batch_size", "seq_len", "cores", "jobs", "threads_per_run", "steps",
                "tokens_per_s", "tokens_per_s_min_run", "tokens_per_s_max_run", "ratio"]


def job_counts(cores: int) -> list[int]:
    """The worker counts to measure: every N that divides ``cores`` (so each run gets cores // N threads)."""
    return [n for n in range(1, cores + 1) if cores % n == 0]


def run_steps(setup: TrainSetup, threads: int, steps: int, data_dir: str | None, wait=lambda: None) -> float:
    """Train ``steps`` AdamW steps of ``setup`` on the CPU with ``threads`` torch threads; return tokens/s.
    ``wait`` is called after the model, data and two warm-up steps are ready, before the timed steps."""
    from ..data import load_data

    torch.set_num_threads(threads)
    data = load_data(setup.dataset, seq_len=setup.seq_len, vocab_size=setup.vocab_size, seed=setup.seed,
                     cache_dir=data_dir, val_tokens=setup.eval_tokens)
    (loop,) = make_loops(["adamw"], setup, data, torch.device("cpu"), torch.float32)
    loop.step()
    loop.step()
    wait()
    start = time.perf_counter()
    for _ in range(steps):
        loop.step()
    return steps * setup.batch_size * setup.seq_len / (time.perf_counter() - start)


def _worker(setup: dict, threads: int, steps: int, data_dir: str | None, barrier, queue) -> None:
    try:
        queue.put(run_steps(TrainSetup(**setup), threads, steps, data_dir, wait=barrier.wait))
    except BaseException as exc:  # report instead of leaving the parent waiting
        barrier.abort()
        queue.put(exc)


def jobs_throughput(setup: TrainSetup, steps: int, data_dir: str | None = None, cores: int | None = None,
                    log=print) -> list[dict]:
    """One row per worker count N (:func:`job_counts`): total tokens/s of N simultaneous runs, and the ratio
    to one run with every core."""
    cores = cores or os.cpu_count() or 1
    ctx = get_context("spawn")
    rows = []
    for jobs in job_counts(cores):
        barrier, queue = ctx.Barrier(jobs), ctx.Queue()
        workers = [ctx.Process(target=_worker, args=(asdict(setup), cores // jobs, steps, data_dir, barrier, queue))
                   for _ in range(jobs)]
        for w in workers:
            w.start()
        rates = [queue.get(timeout=1800) for _ in workers]
        for w in workers:
            w.join()
        failed = [r for r in rates if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"a benchmark worker failed: {failed[0]!r}")
        rows.append({"model": setup.model, "vocab_size": setup.vocab_size, "batch_size": setup.batch_size,
                     "seq_len": setup.seq_len, "cores": cores, "jobs": jobs, "threads_per_run": cores // jobs,
                     "steps": steps, "tokens_per_s": sum(rates), "tokens_per_s_min_run": min(rates),
                     "tokens_per_s_max_run": max(rates)})
        log(f"  JOBS={jobs} ({cores // jobs} thread(s) each): {sum(rates):,.0f} tokens/s in total")
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows
