"""Notebook 01's measure and summary (fixed points of SR-Sinkhorn and of SWAN's pair): the fixed-point residual of a
matrix under a set of normalizations, and README bullets from the notebook's tables.

The notebook computes the tables (residual after L passes on synthetic matrices and on captured LLaMA
gradients, the monotone inner products, the passes each precision needs); this module turns them into the
sentences of README's "Fixed point" section, so the wording lives in one tested place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from multinorm.normalize import Normalizer, multi_normalize

__all__ = ["fixed_point_residual", "shape_kind", "summary_lines", "MONOTONE_TOL"]

KIND_NAMES = {"wide": "wide matrices", "square": "square ones", "tall": "tall ones"}
KIND_LAYERS = {"wide": "`down_proj`", "square": "the attention projections", "tall": "`gate_proj`, `up_proj`"}
# docs/algorithms.md#when-one-pass-is-a-fixed-point: GradNorm along the input dimension, then the polar factor,
# is a fixed point after one pass on wide matrices only
PREDICTED = {"wide": True, "square": False, "tall": False}
WHEN = {"init": "at initialisation", "trained": "after training"}


def fixed_point_residual(G: Tensor, ops: Sequence[str | Normalizer]) -> float:
    r"""``max_i ||P_i(G) - G||_F / ||G||_F`` over the normalizations ``ops`` (names of
    :data:`multinorm.normalize.NORMALIZERS` or callables; Frobenius over the whole tensor), computed in float32
    (float64 for a float64 ``G``). Zero when G is a simultaneous fixed point of every P_i; 0.0 for an all-zero G.
    A measurement for the study, read on the host (unlike the optimizers' steps, it synchronises)."""
    if isinstance(ops, str):
        ops = (ops,)
    X = G.to(torch.float64 if G.dtype == torch.float64 else torch.float32)
    norm = torch.linalg.vector_norm(X).item()
    if norm == 0.0:
        return 0.0
    return max(torch.linalg.vector_norm(multi_normalize(X, (op,)) - X).item() for op in ops) / norm


def shape_kind(m: int, n: int) -> str:
    """"square", "tall" (more rows: outputs) or "wide"."""
    return "square" if m == n else ("tall" if m > n else "wide")


def _sci_range(values: Iterable[float]) -> str:
    values = list(values)
    lo, hi = f"{min(values):.1e}", f"{max(values):.1e}"
    return lo if lo == hi else f"{lo}–{hi}"


def _join(items: Iterable[str], word: str = "and") -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {word} " + items[-1]


def _as_passes(value) -> float:
    """A "L for ..." cell of the passes table: an int, or "> limit" (not reached within the passes computed)."""
    text = str(value).strip()
    return math.inf if text.startswith(">") else int(float(text))


def _passes_range(values: Iterable[float], limit: int) -> str:
    values = list(values)
    show = lambda L: f"> {limit}" if math.isinf(L) else str(L)  # noqa: E731
    lo, hi = min(values), max(values)
    return show(lo) if lo == hi else f"{show(lo)}–{show(hi)}"


def _swan_line(swan: pd.DataFrame, swan_real: pd.DataFrame, fp32_eps: float) -> str:
    L_swan = int(swan.L.max())
    kinds = [k for k in ("wide", "square", "tall") if k in set(swan.shape_kind)]
    first = {k: swan[(swan.shape_kind == k) & (swan.L == 1)].residual for k in kinds}
    last = {k: swan[(swan.shape_kind == k) & (swan.L == L_swan)].residual for k in kinds}
    holds = {k: bool(first[k].max() <= fp32_eps) for k in kinds}

    def details(k: str) -> str:
        text = KIND_LAYERS[k] + (f": worst residual {first[k].max():.1e} after one pass" if holds[k] else
                                 f": residual {_sci_range(first[k])} after one pass, {_sci_range(last[k])} after "
                                 f"{L_swan} passes")
        on_real = swan_real[swan_real.shape_kind == k].residual
        return text + (f"; real LLaMA gradients {_sci_range(on_real)} after one pass" if len(on_real) else "")

    yes, no = [k for k in kinds if holds[k]], [k for k in kinds if not holds[k]]
    head = "SWAN's pair (GradNorm along the input dimension, then the spectral projection)"
    if yes:
        line = (f"* **{head} is a one-pass fixed point on {_join(KIND_NAMES[k] for k in yes)}** "
                f"({'; '.join(details(k) for k in yes)})")
        line += (", but not on " + _join((f"{KIND_NAMES[k]} ({details(k)})" for k in no), "or")) if no else ""
    else:
        line = f"* **{head} is not a one-pass fixed point on** " + _join(
            (f"{KIND_NAMES[k]} ({details(k)})" for k in no), "or")
    line += ". "
    mismatch = [k for k in kinds if holds[k] != PREDICTED[k]]
    line += ("This is what `docs/algorithms.md#when-one-pass-is-a-fixed-point` predicts"
             + ("; on square matrices, centring leaves the polar factor one zero singular value." if "square" in kinds
                else ".") if not mismatch else
             "`docs/algorithms.md#when-one-pass-is-a-fixed-point` predicts a one-pass fixed point on wide matrices "
             f"only; the {_join(mismatch)} matrices do not follow that prediction.")
    return line + " (One-pass fixed point: residual at or below float32 precision after one pass.)"


def _sinkhorn_line(needed: pd.DataFrame, real: pd.DataFrame, thresholds: Mapping[str, float], *, max_iters: int,
                   default_iters: int, capture_tokens: int, fp32_eps: float) -> str:
    need = needed.assign(when=needed.group.str.extract(r"\((\w+)\)$", expand=False))
    need_real = need[(need.method == "SinkGD") & (need.source == "LLaMA gradient")]
    need_syn = need[(need.method == "SinkGD") & (need.source == "synthetic")]
    cols = {label: f"L for {label}" for label in thresholds}
    per_when = {when: {label: [_as_passes(v) for v in d[col]] for label, col in cols.items()}
                for when, d in need_real.groupby("when", sort=False)}
    names = {"init": WHEN["init"], "trained": f"after training ({capture_tokens:,} AdamW tokens)"}
    needed_text = "; ".join(
        f"{names.get(when, when)} " + ", ".join(f"{_passes_range(Ls, max_iters)} ({label})" for label, Ls in w.items())
        for when, w in per_when.items())
    syn_text = ", ".join(f"{_passes_range([_as_passes(v) for v in need_syn[col]], max_iters)} ({label})"
                         for label, col in cols.items())
    enough = [label for label in cols if all(max(w[label]) <= default_iters for w in per_when.values())]
    short = [label for label in cols if label not in enough]
    real_sink = real[real.method == "SinkGD"]
    if default_iters > max_iters:
        verdict = f"SinkGD's default L = {default_iters} is beyond the {max_iters} passes computed here"
    else:
        if not short:
            verdict = f"SinkGD's default L = {default_iters} is enough for every one of these precisions on every layer"
        elif not enough:
            verdict = f"SinkGD's default L = {default_iters} is not enough for any of these precisions on every layer"
        else:
            verdict = (f"SinkGD's default L = {default_iters} is enough for {_join(enough)} on every layer, "
                       f"not for {_join(short, 'or')}")
        verdict += "; the worst residual it leaves is " + " and ".join(
            f"{real_sink[(real_sink.when == when) & (real_sink.L == default_iters)].residual.max():.1e} "
            f"{WHEN.get(when, when)}" for when in per_when)
    real_fp32 = max(max(w["fp32"]) for w in per_when.values())
    syn_fp32 = max(_as_passes(v) for v in need_syn[cols["fp32"]])
    if math.isinf(real_fp32) and math.isinf(syn_fp32):
        head = f"SR-Sinkhorn does not reach fp32 precision within {max_iters} passes on real or synthetic matrices."
    else:
        compare = "more" if real_fp32 > syn_fp32 else ("fewer" if real_fp32 < syn_fp32 else "as many")
        head = (f"SR-Sinkhorn needs {compare} passes on real LLaMA gradients {'as' if compare == 'as many' else 'than'} "
                f"on synthetic matrices to reach fp32 precision.")
    return (f"* **{head}** Smallest L whose residual reaches each precision (fp32 = {fp32_eps:.2e}), range over the "
            f"layer types (worst layer of each type): {needed_text}; synthetic matrices {syn_text}. {verdict}.")


# Rounding tolerance on a_k / mn when checking that the monotone quantity never decreases: float64 round-off of a
# sum of mn terms of order 1 is a few units of 2^-52 (2.2e-16) of mn, so wiggles below this are rounding.
MONOTONE_TOL = 1e-12


def summary_lines(synthetic: pd.DataFrame, real: pd.DataFrame, needed: pd.DataFrame, monotone: pd.DataFrame,
                  thresholds: Mapping[str, float], *, max_iters: int, default_iters: int, capture_tokens: int,
                  fp32_eps: float) -> list[str]:
    """README bullets of notebook 01 from its tables (columns as the notebook writes them): SR-Sinkhorn's
    convergence, the passes each precision needs next to SinkGD's default L, the monotone inner products, and
    for which shapes SWAN's pair is a one-pass fixed point (with docs/algorithms.md's prediction)."""
    sink = synthetic[synthetic.method == "SinkGD"]
    swan = synthetic[synthetic.method == "SWAN"]
    at = lambda L: sink[sink.L == L].residual.max()  # noqa: E731
    L_mid = min(default_iters, max_iters)
    swan_real = real[(real.method == "SWAN") & (real.L == 1)]
    swan_real = swan_real.assign(shape_kind=[shape_kind(*map(int, s.split("×"))) for s in swan_real["shape"]])
    flags = monotone["non-decreasing from k=2"]
    return [
        f"* **SR-Sinkhorn converges to a fixed point.** Worst residual over {sink['shape'].nunique()} shapes × 2 "
        f"matrix kinds: {at(1):.1e} after L = 1, {at(L_mid):.1e} after L = {L_mid}, {at(max_iters):.1e} after "
        f"L = {max_iters}.",
        _sinkhorn_line(needed, real, thresholds, max_iters=max_iters, default_iters=default_iters,
                       capture_tokens=capture_tokens, fp32_eps=fp32_eps),
        f"* **The monotone quantity** ⟨x_k, x_(k+1)⟩ is non-decreasing from k = 2 on {int(flags.sum())} of "
        f"{len(monotone)} matrix/method cases, up to float64 round-off (a tolerance of {MONOTONE_TOL:g} on "
        f"⟨x_k, x_(k+1)⟩ / mn).",
        _swan_line(swan, swan_real, fp32_eps),
    ]
