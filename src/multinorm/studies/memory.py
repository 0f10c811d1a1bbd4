"""Analytic memory of a method at a model size: weights plus optimizer states.

The papers' table convention (docs/benchmark.md#analytic-memory-estimate) counts weights and optimizer
states in BF16 (2 bytes each) and leaves out gradients and activations:

    memory = bytes_per_value · (P_total + S),   S = state elements of the method

State elements per hidden matrix W ∈ ℝ^{m×n} (r = projection rank), as the optimizers run by this package
(``multinorm.optim.build_optimizer``: torch and the methods' own packages) keep them:

    AdamW                          2mn                        (first and second moments)
    SGD                            0                          (mn with momentum)
    SinkGD, SWAN, SWAN-NSDS, MNGD  0                          (stateless: the update is a function of the gradient)
    Muon                           mn                         (momentum buffer)
    GaLore, Fira                   min(m,n)·r + 2·r·max(m,n)  (SVD projector + moments in the rank-r subspace;
                                                               r = min(rank, m, n))
    APOLLO(-Mini)                  min(m,n)·r + 2·r·max(m,n)  (random projector + moments in the rank-r subspace)

Embeddings, LM head and norms take AdamW (2 state elements each) in every method of the papers'
recipe except plain SGD and "swan-0", the fully stateless reading of SWAN-0 (docs/algorithms.md#swan-0).

Notes on what is counted:

- **Ranks.** At the paper sizes the rank is the benchmark scripts' (``DEFAULT_RANKS``); at any other size
  (the CPU models "nano", "micro", ...) it is the registry default of the method,
  ``multinorm.optim.OPTIMIZERS[name].defaults["rank"]`` (128; APOLLO-Mini 1), the rank a run that sets none
  uses. Pass ``rank`` to count another one.
- **APOLLO's projector.** The APOLLO paper re-draws its random projection from a seed, so the projection
  need not be stored; apollo-torch, the implementation run here, keeps it in the optimizer state between
  refreshes (a min(m,n)×r matrix, rank not clipped to min(m,n)), so it is counted.
- **Scalars are left out:** torch AdamW's step counter (one element per parameter tensor), and APOLLO's and
  Fira's norm-growth-limiter norm (one element per hidden matrix). ``optimizer_state_bytes`` of a run
  counts them, so it exceeds this count by those few elements.
- **GaLore's and Fira's projector in fp32.** For fp32 weights galore-torch and fira keep the projector as a
  slice (view) of the full SVD factor, so the memory held is min(m,n)² elements per matrix, not min(m,n)·r,
  until the next refresh; with BF16 weights (the convention here) it is a compact copy. The count here, like
  ``optimizer_state_bytes``, is the slice's elements.

``METHODS`` holds every name of the optimizer registry (``multinorm.optim.OPTIMIZERS``) plus "swan-0".
Study labels such as "adamw-split" or "frozen-hidden" are AdamW run at other learning rates: their memory
is AdamW's.
"""

from __future__ import annotations

from functools import lru_cache

from multinorm.llama import MODEL_CONFIGS, build_model, split_parameters

__all__ = ["METHODS", "DEFAULT_RANKS", "default_rank", "hidden_shapes", "state_elements", "analytic_memory",
           "compiled_step_rss_bytes"]

# Projection ranks of the benchmark scripts (docs/benchmark.md#projection-ranks); APOLLO-Mini is rank 1 at
# every size.
DEFAULT_RANKS = {
    "galore": {"60m": 128, "130m": 256, "350m": 256, "1b": 512},
    "fira": {"60m": 128, "130m": 256, "350m": 256, "1b": 512},
    "apollo": {"60m": 128, "130m": 192, "350m": 256, "1b": 256},
    "apollo-mini": {size: 1 for size in ("60m", "130m", "350m", "1b")},
}

METHODS = ("adamw", "sgd", "sinkgd", "swan", "swan-nsds", "mngd", "swan-0", "muon", "galore", "fira", "apollo",
           "apollo-mini")
_STATELESS = ("sgd", "sinkgd", "swan", "swan-nsds", "mngd", "swan-0")


@lru_cache(maxsize=None)
def hidden_shapes(model: str, vocab_size: int | None = None) -> tuple[tuple[tuple[int, int], ...], int]:
    """Shapes of the hidden matrices and the element count of everything else (meta device, no memory)."""
    if vocab_size is None and MODEL_CONFIGS[model].vocab_size is None:
        vocab_size = 4096
    hidden, rest = split_parameters(build_model(model, vocab_size, device="meta"))
    return tuple(tuple(p.shape) for _, p in hidden), sum(p.numel() for _, p in rest)


def default_rank(model: str, method: str) -> int | None:
    """The projection rank counted for `method` at `model` when none is given (None: no projection).

    The benchmark scripts' rank at a paper size (``DEFAULT_RANKS``), else the registry default of the
    method, which is what a training run that sets no rank uses."""
    if method not in DEFAULT_RANKS:
        return None
    if model in DEFAULT_RANKS[method]:
        return DEFAULT_RANKS[method][model]
    from multinorm.optim import OPTIMIZERS

    return OPTIMIZERS[method].defaults["rank"]


def _matrix_state(method: str, m: int, n: int, rank: int | None) -> int:
    if method == "adamw":
        return 2 * m * n
    if method in _STATELESS:
        return 0
    if method == "muon":
        return m * n
    if method in ("galore", "fira"):  # the SVD has min(m, n) singular vectors: rank is clipped
        r = min(rank, m, n)
        return min(m, n) * r + 2 * r * max(m, n)
    if method in ("apollo", "apollo-mini"):  # a random min(m, n) x rank projector, any rank
        return min(m, n) * rank + 2 * rank * max(m, n)
    raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")


def state_elements(model: str, method: str, rank: int | None = None, vocab_size: int | None = None) -> dict[str, int]:
    """Optimizer-state element counts of `method` on `model`: hidden matrices, the rest, and the total.

    `rank` (low-rank methods only): the projection rank; default :func:`default_rank`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if rank is None:
        rank = default_rank(model, method)
    shapes, n_rest = hidden_shapes(model, vocab_size)
    hidden = sum(_matrix_state(method, m, n, rank) for m, n in shapes)
    rest = 0 if method in ("sgd", "swan-0") else 2 * n_rest
    return {"hidden": hidden, "rest": rest, "total": hidden + rest}


def analytic_memory(model: str, method: str, rank: int | None = None, bytes_per_value: int = 2,
                    vocab_size: int | None = None) -> dict[str, float]:
    """Weights + optimizer states in bytes (the papers' convention: BF16, no gradients or activations)."""
    shapes, n_rest = hidden_shapes(model, vocab_size)
    n_weights = sum(m * n for m, n in shapes) + n_rest
    states = state_elements(model, method, rank, vocab_size)["total"]
    total = bytes_per_value * (n_weights + states)
    return {"model": model, "method": method, "parameters": n_weights, "state_elements": states,
            "bytes": total, "GB": total / 1e9, "GiB": total / 2**30}


_COMPILED_STEP_PROBE = """
import json, torch
from multinorm.optim import SinkGD
def rss():  # resident bytes now (a peak could hide the increase behind an earlier transient)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
W = torch.nn.Parameter(torch.randn(64, 32)); W.grad = torch.randn(64, 32)
SinkGD([W], fused=False).step()  # torch's own operators warmed up first
before = rss()
SinkGD([W]).step()
print(json.dumps({"before": before, "after": rss()}))
"""


def compiled_step_rss_bytes() -> int:
    """How much SinkGD's compiled CPU step (:mod:`multinorm.optim.sinkgd_cpu`) adds to a fresh process's resident
    memory: numba and llvmlite imported, the compiled loop loaded (from numba's cache, or compiled). A fixed cost
    per process, whatever the model size, that stays resident; measured in a subprocess so that nothing is loaded
    already (Linux: ``/proc/self/status``)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _COMPILED_STEP_PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    return probe["after"] - probe["before"]
