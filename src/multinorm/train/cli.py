"""The command line: ``python -m multinorm.train`` (every flag is a :class:`TrainConfig` field)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys

from multinorm.data import DATASETS
from multinorm.io import parse_assignment
from multinorm.llama import MODEL_CONFIGS
from multinorm.optim import OPTIMIZERS
from multinorm.parallel import MODES, launch_rank

from .config import DTYPES, ConfigError, TrainConfig
from .loop import train

__all__ = ["build_parser", "main"]


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
