"""The trainer: a run from a :class:`TrainConfig` to its folder of records (`python -m multinorm.train`).

Its named parts, one module each:

    config       TrainConfig (every setting; field names are the CLI flags) and its validation
    loop         `train`: data, model, optimizer, schedule, the step (forward, backward, optimizer), stops
    evaluation   the validation loss (exact, or the GaLore evaluator's quirk)
    records      the run folder: config.json, one metrics-row builder for metrics.jsonl, summary.json
    checkpoint   checkpoint.pt (one process) and checkpoint.dcp/ (several), written atomically, resumable
    signals      SIGINT/SIGTERM as a request to stop after the current step
    cli          the command line

One run = one folder `results/runs/<run-id>/`:

    config.json      every setting needed to re-run, plus package version, git commit, torch, device
    metrics.jsonl    one line per logged step: step, tokens, train_loss, val_loss, val_ppl, lr,
                     tokens_per_s, wall_s, optimizer_state_bytes, peak_memory_bytes
    summary.json     final status ("completed" / "diverged" / "interrupted"), final validation loss/ppl, throughput
    checkpoint.pt    model + optimizer + scheduler + step (git-ignored), for `--resume`
    checkpoint.dcp/  the same, written by a run on several processes (`multinorm.train.checkpoint`)

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

from .checkpoint import load_checkpoint
from .cli import build_parser, main
from .config import DTYPES, ConfigError, TrainConfig
from .evaluation import evaluate
from .loop import build_scheduler, train
from .records import CODE_PATHS, RunResult, read_metrics
from .signals import STOP_SIGNALS, SignalLatch

__all__ = ["TrainConfig", "RunResult", "ConfigError", "train", "build_scheduler", "evaluate", "load_checkpoint",
           "read_metrics", "main", "build_parser", "DTYPES", "CODE_PATHS", "STOP_SIGNALS", "SignalLatch"]
