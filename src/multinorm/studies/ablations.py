"""The ablation variants of notebook 04 and the answers their paired comparisons give.

Each variant removes or changes one part of a parent method (SinkGD or SWAN) and is compared with that parent
run for run, paired by seed (`multinorm.studies.convergence.paired_comparisons`). The questions:

* SR-Sinkhorn passes (Algorithm 3 of the SinkGD paper, L = 5 by default): is one pass (or ten) as good?
* SWAN's parts: GradNorm alone, whitening alone, both; the SWAN paper reports that both are needed.
* One-sided normalization: rows only, columns only, or both, as SinkGD's alternating projections do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["Variant", "VARIANTS", "QUESTIONS", "effect", "ablation_answers", "lr_sensitivity"]


@dataclass(frozen=True)
class Variant:
    """A change to ``parent``: trained with the registry optimizer ``optimizer`` and ``hparams``."""

    parent: str
    optimizer: str
    hparams: dict[str, Any] = field(default_factory=dict)
    change: str = ""


VARIANTS: dict[str, Variant] = {
    "sinkgd-L1": Variant("sinkgd", "sinkgd", {"iters": 1}, "one SR-Sinkhorn pass instead of 5"),
    "sinkgd-L2": Variant("sinkgd", "sinkgd", {"iters": 2}, "two SR-Sinkhorn passes instead of 5"),
    "sinkgd-L10": Variant("sinkgd", "sinkgd", {"iters": 10}, "ten SR-Sinkhorn passes instead of 5"),
    "swan-gradnorm-only": Variant("swan", "swan", {"whiten": False}, "SWAN without whitening"),
    "swan-whiten-only": Variant("swan", "swan", {"gradnorm": False}, "SWAN without GradNorm"),
    "swan-nsds": Variant("swan", "swan-nsds", {}, "SWAN with the cheap NSDS whitening"),
    "rows-only": Variant("sinkgd", "mngd", {"norms": ["row"], "iters": 1}, "rows normalized only"),
    "cols-only": Variant("sinkgd", "mngd", {"norms": ["col"], "iters": 1}, "columns normalized only"),
}

# question -> the variants that answer it, in the order the answer names them
QUESTIONS = {
    "SR-Sinkhorn passes": ("sinkgd-L1", "sinkgd-L2", "sinkgd-L10"),
    "SWAN's parts": ("swan-gradnorm-only", "swan-whiten-only", "swan-nsds"),
    "One-sided normalization": ("rows-only", "cols-only"),
}


def effect(row: Any) -> str:
    """'worse than', 'better than' or 'not distinguishable from' the parent, from the 95 % interval of the
    paired final-loss difference (variant - parent; > 0: the variant ends higher, i.e. worse)."""
    if row.ci_low > 0:
        return "worse than"
    if row.ci_high < 0:
        return "better than"
    return "not distinguishable from"


def _said(name: str, row: Any) -> str:
    return (f"{name} ({VARIANTS[name].change}) is {effect(row)} {VARIANTS[name].parent} "
            f"({row.estimate:+.3f} nats [{row.ci_low:+.3f}, {row.ci_high:+.3f}], {int(row.n)} seeds)")


def _swan_parts(diff: pd.DataFrame) -> str | None:
    parts = [v for v in ("swan-gradnorm-only", "swan-whiten-only") if v in diff.index]
    if len(parts) < 2:
        return None
    needed = [v for v in parts if diff.loc[v, "ci_low"] > 0]
    if len(needed) == 2:
        return "SWAN's claim that both parts are needed: **reproduced** (removing either makes SWAN worse)."
    if needed:
        kept = "whitening" if needed == ["swan-gradnorm-only"] else "GradNorm"
        return (f"SWAN's claim that both parts are needed: **partly** (removing {kept} makes it worse; the other "
                f"removal makes no resolved difference).")
    return "SWAN's claim that both parts are needed: **not reproduced** (neither removal makes a resolved difference)."


def ablation_answers(diff: pd.DataFrame, grids: pd.DataFrame | None = None) -> str:
    """Markdown bullets answering each question from ``diff``: rows of ``paired_comparisons`` with
    ``quantity == "final_loss_diff"`` (columns method, estimate, ci_low, ci_high, n); ``grids``
    (`multinorm.studies.convergence.interior`) adds whether every tuned lr is interior to its grid."""
    diff = diff.set_index("method")
    lines = []
    for question, names in QUESTIONS.items():
        present = [v for v in names if v in diff.index and pd.notna(diff.loc[v, "estimate"])]
        if not present:
            continue
        lines.append(f"* **{question}**: " + "; ".join(_said(v, diff.loc[v]) for v in present) + ".")
        if question == "SWAN's parts" and (verdict := _swan_parts(diff)):
            lines.append(f"  {verdict}")
    missing = [v for v in diff.index if pd.isna(diff.loc[v, "estimate"])]
    if missing:
        lines.append("* No paired comparison (a seed diverged or is missing): " + ", ".join(missing) + ".")
    if grids is not None:
        edges = grids.loc[~grids["interior"].astype(bool), "method"].tolist()
        lines.append("* Every variant's tuned lr is interior to its grid." if not edges else
                     "* Best lr on a grid edge after the allowed extensions: " + ", ".join(edges) + ".")
    return "\n".join(lines)


def lr_sensitivity(sweep: pd.DataFrame, tuned: pd.DataFrame, factor: float = 2.0) -> pd.DataFrame:
    """How much each method's final loss (seed 0, at its tuned beta2) rises when its lr is off by ``factor`` either
    way: the same window for every method, whatever the width of its grid (a range over a wider grid would rank
    methods by their grids, not by their sensitivity).

    ``tuned``: per method (index) the tuned ``lr`` and ``beta2``. Columns: method, loss at the tuned lr, at lr /
    factor and at lr x factor, and ``rise`` = the larger of the two minus the tuned loss (NaN when the grid lacks a
    side; a diverged run counts as infinite).
    """
    rows = []
    for method, runs in sweep[(sweep.seed == 0) & (sweep.lr > 0)].groupby("method", sort=False):
        if method not in tuned.index:
            continue
        best = tuned.loc[method]
        at = runs[runs.beta2 == best.beta2].set_index("lr").final_val_loss
        loss = {k: float(at[np.isclose(at.index, best.lr * m)].min()) if np.isclose(at.index, best.lr * m).any()
                else np.nan for k, m in (("low", 1 / factor), ("tuned", 1.0), ("high", factor))}
        rows.append({"method": method, "loss_tuned": loss["tuned"], "loss_low": loss["low"], "loss_high": loss["high"],
                     "rise": (np.nan if np.isnan(loss["low"]) or np.isnan(loss["high"])
                              else max(loss["low"], loss["high"]) - loss["tuned"])})
    return pd.DataFrame(rows, columns=["method", "loss_tuned", "loss_low", "loss_high", "rise"])
