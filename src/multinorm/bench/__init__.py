"""Benchmark of the optimizers: step time against AdamW, compute and bandwidth floors, training throughput.

    python -m multinorm.bench --out results/bench            (make bench)
    python -m multinorm.bench --quick --out /tmp/bench        (tiny sizes, under a minute)
    python -m multinorm.bench --targets-only                  (re-evaluate the targets from the CSVs)
    python -m multinorm.bench.comm --out results/bench       (collectives per step on 2-8 ranks, simulated)

Every ratio is measured in one process, interleaved: the two sides are timed in alternation
(A B A B ..., ``--rounds`` rounds; each measurement is a ``torch.utils.benchmark`` ``blocked_autorange``),
and the ratio reported is the median of the per-round ratios, with its min and max. Every method is timed at
``--threads`` (default 1); the AdamW references, SinkGD and the training part are timed again with every
available core, a training run's default (rows say which in ``threads`` and ``threading``; ``--no-all-cores``
skips that pass). Files in ``--out``:

* ``optimizer_step.csv`` -- per setting (``block-1b``: one LLaMA-1B block's 7 hidden matrices; ``micro``:
  the micro model's hidden matrices; on CUDA also every hidden matrix of 350M and 1B) and method: step
  time, ratio to AdamW (fused: torch's fastest), optimizer-state bytes, peak transient memory of
  one step, host syncs during one step (``aten._local_scalar_dense`` calls);
* ``compute_floor.csv`` -- SWAN's step against its compute floor: the matmul FLOPs of its whitening
  divided by the fp32 matmul rate of this machine, measured in the same rounds on a square matmul of
  the matrices' smaller side;
* ``bandwidth.csv`` -- bytes a step must move (AdamW: 7 tensor passes; SGD: 3; SinkGD: one read of the
  gradient per Sinkhorn iteration and the update's three passes), the bandwidth the step achieves, and the
  floor time at the memory bandwidth of this machine, measured in the same process (read-only passes at the
  read stream's rate, the others at the best stream's);
* ``train_throughput.csv`` -- tokens/s of ``nano`` training steps (studies' defaults: batch 8 x 256
  tokens, vocabulary 1024) for AdamW, SinkGD and SWAN, interleaved, with the ratio to AdamW (median,
  min-max and 95 % interval over rounds) and the time of each step's optimizer phase against AdamW's;
* ``jobs_throughput.csv`` -- total tokens/s of N such runs trained at once with cores / N threads each,
  for every N dividing the cores: what ``make figures JOBS=N`` suits this machine (``bench.jobs``);
* ``train_profile.csv`` -- where such a step spends its time (data, forward, backward, optimizer,
  evaluation amortized over its interval, other), from ``torch.profiler`` ranges;
* ``raw_times.csv`` -- every per-round time behind the ratios;
* ``environment.json`` -- CPU, cores, threads, versions, BLAS, GPU, load, date, measured bandwidths;
* ``targets.csv`` -- ``target, measured, threshold, status`` (met / not met / not measured), also
  printed; targets are reported, never enforced;
* ``readme_bench.md`` -- a short summary for the README.
"""

from .cli import main, parse_args
from .measure import HostSyncCounter, count_host_syncs, interleave, peak_extra_bytes, ratio_summary
from .steps import BLOCK_1B_SHAPES, Traffic, bandwidth_floor, swan_flops, traffic
from .targets import TARGETS, evaluate_targets

__all__ = ["main", "parse_args", "HostSyncCounter", "count_host_syncs", "interleave", "peak_extra_bytes",
           "ratio_summary", "BLOCK_1B_SHAPES", "swan_flops", "Traffic", "traffic", "bandwidth_floor", "TARGETS", "evaluate_targets"]
