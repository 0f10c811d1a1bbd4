"""The scaling study of notebook 05: as the regime moves toward the papers' (larger batches, wider models), does
each method's paired token speed-up over a tuned AdamW move toward the papers' claims, away from them, or stay?

A *cell* is a model and a batch size at the study's number of steps. Every cell runs the protocol of
:mod:`multinorm.studies.convergence` on its own: AdamW tuned over lr x beta2 in {0.95, 0.999} (each beta2 to an interior
optimum), the hidden-frozen control at the tuned AdamW (for R2), and SinkGD, SWAN and Muon tuned on seed 0 and
re-run on more seeds, paired by seed against the cell's AdamW. A cell's lr grids are centred on the tuned lr of
its neighbour toward the base cell (:func:`centred_grid`), so three points usually suffice; an optimum on an
edge extends the grid as in notebook 02.

Design: one number of steps for every cell (the base cell's 768): a larger batch sees proportionally more
tokens, and every cell evaluates at the same steps (:func:`cell_config`). The fixed-token design of
critical-batch studies was probed first (notebook 05) and fails the regime checks: at the base budget of
1.57 M tokens, 8,192 tokens per step leaves AdamW about 0.8 nats *above* the count bigram whichever beta2, so
beyond 4,096 tokens per step a fixed budget would have to grow for every cell. At fixed steps the batch axis
moves toward the papers' regime in tokens per step and in tokens per parameter together; the notebook says so
wherever it reads a trend. The base cell (``nano``, 8 sequences of 256 tokens, 768 steps) is notebook 02's
regime, and its runs are notebook 02's (:func:`runs_dir_of`): they are not trained twice.

The trend of a claim along an axis (:func:`trend`) is the least-squares slope of the per-seed log speed-ups on
log2 of the axis (tokens per step, or width), with its 95 % t interval: "toward the claim" or "away" when the
interval excludes 0 on that side, "flat" when it lies within +-5 % per doubling, "undecided" otherwise. A
speed-up of a method that never reached the reference's final loss is only a bound, and a slope fitted to bounds
means nothing; where any seed of an axis is such a bound, the trend is read from the paired final-loss gap
instead (:func:`gap_trend`: method minus reference, in nats per doubling; falling is toward a claim of fewer
tokens, flat within +-0.01 nats per doubling).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from multinorm.studies.convergence import (ConvergenceStudy, StudyMethod, _curve, best_config, interior,
                                           paired_comparisons, seed_curves, speedup_verdict)
from multinorm.studies.stats import token_speedup
from multinorm.train import TrainConfig

__all__ = ["Cell", "cell_config", "centred_grid", "runs_dir_of", "ScalingStudy", "CellResult", "cell_rows",
           "seed_speedups", "seed_loss_gaps", "trend", "gap_trend", "TREND_MARGIN", "GAP_MARGIN", "EXPLANATIONS", "RECIPE_CLAIM",
           "with_explanations", "explanation_verdict", "CAMPAIGN_BUDGET_HOURS", "CAMPAIGN_STUDIES",
           "campaign_time_text"]

# "flat": the slope's interval lies within this factor per doubling of the axis.
TREND_MARGIN = 1.05
GAP_MARGIN = 0.01  # nats per doubling: a final-loss gap whose slope stays within +-this is "flat"
# The campaign's planned cost, in hours of a 2-core machine, and the run folders that are its own: the base
# cell's runs are notebook 02's (results/runs/convergence) and are not counted again.
CAMPAIGN_BUDGET_HOURS = 12.0
CAMPAIGN_STUDIES = ("scaling", "scaling_probe")


@dataclass(frozen=True)
class Cell:
    """A model and a batch size (sequences per step) at the study's number of steps."""

    model: str
    batch_size: int

    def name(self, seq_len: int) -> str:
        return f"{self.model}-{self.batch_size * seq_len}"


def cell_config(base: TrainConfig, cell: Cell) -> TrainConfig:
    """``base`` at the cell's model and batch for the same number of steps (so ``tokens`` grows with the batch)
    and the same evaluation steps. The base cell's config is ``base`` itself, so its runs are the base study's."""
    if cell.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {cell.batch_size}")
    return dataclasses.replace(base, model=cell.model, batch_size=cell.batch_size,
                               tokens=base.steps * cell.batch_size * base.seq_len)


def centred_grid(lr: float, points: int = 3, factor: float = 2.0) -> tuple[float, ...]:
    """``points`` learning rates spaced by ``factor`` around ``lr`` (lr in the middle; for an even count, the
    extra point is above)."""
    if lr <= 0 or points < 1:
        raise ValueError(f"need lr > 0 and points >= 1, got {lr}, {points}")
    low = -((points - 1) // 2)
    return tuple(float(lr * factor ** k) for k in range(low, low + points))


def runs_dir_of(cell: Cell, base_cell: Cell, results_dir: Path) -> Path:
    """Where a cell's runs live: the base cell's are notebook 02's (``runs/convergence``), the others'
    ``runs/scaling``."""
    return results_dir / "runs" / ("convergence" if cell == base_cell else "scaling")


# The explanations run at the base cell and the largest batch: (name, optimizer, hparams, rest_adamw, grid);
# grid None = centred on the cell's tuned SinkGD lr.
EXPLANATIONS = (
    ("sinkgd-momentum", "sinkgd", {"momentum": 0.9}, True, None),
    # the SinkGD paper's recipe as published: global lr 0.02 (its AdamW part too), alpha = 0.05 on the hidden
    # matrices, AdamW's default betas
    ("sinkgd-paper", "sinkgd", {"scale": 0.05}, False, (0.02,)),
)

# The SinkGD paper's token claim, answered for its recipe as published (the explanation "sinkgd-paper"), beside
# notebook 02's answer for the tuned SinkGD: (claim, paper, factor, method, reference) as in convergence.CLAIMS.
RECIPE_CLAIM = ("SinkGD as published (the paper's recipe, lr 0.02 and α = 0.05) reaches Adam's loss with "
                "2.4-2.8x fewer tokens", "2.4x (350M), 2.8x (1.3B)", 2.4, "sinkgd-paper", "adamw")


@dataclass
class CellResult:
    """One cell's tables: the seed-0 sweep, the reported runs, their curves and the tuned AdamW."""

    cell: Cell
    config: TrainConfig
    sweep: pd.DataFrame
    final: pd.DataFrame
    curves: pd.DataFrame
    adamw: dict[str, Any]


class ScalingStudy:
    """Runs the cells of the study in order, each grid centred on the tuned lrs of an earlier cell.

    ``methods``: name -> (optimizer, hparams) of the methods compared in every cell (``adamw`` is tuned over
    beta2 and is the reference; ``frozen-hidden`` is the control of R2, one seed). ``seeds``: seeds reported per
    method (the sweep's winning run is seed 0)."""

    def __init__(self, base: TrainConfig, results_dir: str | Path, *, base_cell: Cell, methods: Sequence[str],
                 seeds: int = 3, points: int = 3, mode: str = "train", jobs: int = 1, max_extensions: int = 3,
                 progress: bool = True):
        self.base, self.results_dir, self.base_cell = base, Path(results_dir), base_cell
        self.methods, self.seeds, self.points = list(methods), seeds, points
        self.mode, self.jobs, self.max_extensions, self.progress = mode, jobs, max_extensions, progress
        if "adamw" not in self.methods:
            raise ValueError("methods must include 'adamw': it is the reference of every cell")

    def _study(self, cell: Cell) -> ConvergenceStudy:
        return ConvergenceStudy(cell_config(self.base, cell), runs_dir_of(cell, self.base_cell, self.results_dir),
                                mode=self.mode, jobs=self.jobs, max_extensions=self.max_extensions,
                                progress=self.progress)

    def method(self, name: str, centre: float) -> StudyMethod:
        if name == "frozen-hidden":
            return StudyMethod(name, "adamw", (0.0,), seeds=1)
        return StudyMethod(name, name, centred_grid(centre, self.points), seeds=self.seeds,
                           rest_adamw=name != "adamw", tune_beta2=name == "adamw")

    def run_cell(self, cell: Cell, centres: dict[str, float]) -> CellResult:
        """Tune AdamW, then the other methods (their AdamW part at the tuned AdamW), then the seeds.
        ``centres``: method -> the lr its grid is centred on."""
        study = self._study(cell)
        sweep = study.tune_adamw(self.method("adamw", centres["adamw"]))
        others = [self.method(m, centres.get(m, 0.0)) for m in self.methods if m != "adamw"]
        sweep = pd.concat([sweep, study.tune(others)], ignore_index=True)
        final = study.seeds([self.method("adamw", centres["adamw"]), *others], sweep)
        curves = seed_curves(final, study.runs_dir)
        return CellResult(cell, study.base, sweep, final, curves, dict(study.adamw))

    def run_explanations(self, result: CellResult) -> CellResult:
        """SinkGD with momentum (lr tuned, centred on the cell's SinkGD lr) and the paper's recipe as published,
        at ``result``'s cell, with the cell's seeds; returned as a cell result of these two methods. Their runs
        are this study's (``runs/scaling``), at the base cell too."""
        study = ConvergenceStudy(result.config, self.results_dir / "runs" / "scaling", mode=self.mode, jobs=self.jobs,
                                 max_extensions=self.max_extensions, progress=self.progress)
        study.adamw = dict(result.adamw)
        sinkgd_lr = float(best_config(result.sweep).set_index("method").lr["sinkgd"])
        methods = [StudyMethod(name, optimizer, grid or centred_grid(sinkgd_lr, self.points), seeds=self.seeds,
                               hparams=hparams, rest_adamw=rest_adamw)
                   for name, optimizer, hparams, rest_adamw, grid in EXPLANATIONS]
        sweep = study.tune(methods)
        final = study.seeds(methods, sweep)
        return CellResult(result.cell, study.base, sweep, final, seed_curves(final, study.runs_dir), result.adamw)


def with_explanations(result: CellResult, explained: CellResult | None) -> CellResult:
    """A cell's result with the runs of its explanations (:meth:`ScalingStudy.run_explanations`) beside its own,
    so an explanation can be paired with any method of the cell; ``result`` itself when ``explained`` is None."""
    if explained is None:
        return result
    return dataclasses.replace(result, final=pd.concat([result.final, explained.final], ignore_index=True),
                               curves=pd.concat([result.curves, explained.curves], ignore_index=True))


def explanation_verdict(explanations: pd.DataFrame, cell: str,
                        claim: tuple[str, str, float, str, str] = RECIPE_CLAIM) -> dict[str, Any] | None:
    """A verdict row (the columns of :func:`~multinorm.studies.convergence.verdict_table`) for ``claim`` answered
    by an explanation's paired token speed-up at ``cell`` (a row of notebook 05's ``explanations.csv``); None
    while that comparison is not recorded."""
    text, paper, factor, method, reference = claim
    rows = explanations[(explanations.method == method) & (explanations.reference == reference)
                        & (explanations.cell == cell) & (explanations.quantity == "speedup_100")]
    if rows.empty:
        return None
    r = rows.iloc[0]
    n, censored = int(r.n), int(r.censored)
    return {"claim": text, "paper": paper, "ours": float(r.estimate), "ci_low": float(r.ci_low),
            "ci_high": float(r.ci_high), "n": n, "censored": censored, "reference": reference,
            "source": "study runs (notebook 05)", "ceiling": math.nan,
            "verdict": speedup_verdict(float(r.ci_low), float(r.ci_high), factor, n, censored)}


def tuned_lrs(result: CellResult) -> dict[str, float]:
    """Method -> tuned lr of a cell (the centres of a neighbouring cell's grids)."""
    best = best_config(result.sweep).set_index("method")
    return {m: float(best.lr[m]) for m in best.index}


def cell_rows(result: CellResult, parameters: dict[str, int], checks: dict[str, float]) -> pd.DataFrame:
    """One row per method of a cell for ``cells.csv``: the regime (model, width, parameters, tokens per step,
    steps, tokens, tokens per parameter), the tuned lr and beta2 with the interior check, the seeds, the mean
    final loss, and against the cell's AdamW the paired final-loss difference and the token speed-up at 100 %
    with their 95 % intervals (and how many seeds never reached AdamW's final loss). ``checks`` holds the cell's
    R1-R3 values."""
    cfg = result.config
    grids = interior(result.sweep).set_index("method")
    comparisons = paired_comparisons(result.final, result.curves, "adamw").set_index(["method", "quantity"])
    rows = []
    for method, runs in result.final.groupby("method", sort=False):
        row = {"cell": result.cell.name(cfg.seq_len), "model": cfg.model, "width": parameters["width"],
               "parameters": parameters["total"], "hidden_parameters": parameters["hidden"],
               "tokens_per_step": cfg.tokens_per_step, "batch_size": cfg.batch_size, "steps": cfg.steps,
               "tokens": cfg.steps * cfg.tokens_per_step,
               "tokens_per_parameter": cfg.steps * cfg.tokens_per_step / parameters["total"], "method": method,
               "lr": float(runs.lr.iloc[0]), "beta2": float(runs.beta2.iloc[0]),
               "grid": grids.grid.get(method, ""), "interior": bool(grids.interior.get(method, True)),
               "seeds": len(runs), "final_loss": float(runs.final_val_loss.mean())}
        for quantity, key in (("final_loss_diff", "loss_diff"), ("speedup_100", "speedup")):
            if method == "adamw" or (method, quantity) not in comparisons.index:
                row.update({key: math.nan, f"{key}_low": math.nan, f"{key}_high": math.nan})
                continue
            c = comparisons.loc[(method, quantity)]
            row.update({key: c.estimate, f"{key}_low": c.ci_low, f"{key}_high": c.ci_high})
            if quantity == "speedup_100":
                row["censored"] = int(c.censored)
        rows.append({**row, **checks})
    return pd.DataFrame(rows)


def seed_speedups(result: CellResult, method: str, reference: str) -> pd.DataFrame:
    """Per seed: the token speed-up of ``method`` over ``reference`` at the reference's final loss, and whether
    it is censored (the method never reached that loss: the value is its bound)."""
    final, curves = result.final, result.curves
    ref, runs = final[final.method == reference].set_index("seed"), final[final.method == method].set_index("seed")
    rows = []
    for s in sorted(set(ref.index) & set(runs.index)):
        value, cut = token_speedup(*_curve(curves, ref.loc[s, "run_id"]), *_curve(curves, runs.loc[s, "run_id"]), 1.0)
        rows.append({"seed": s, "speedup": value, "censored": bool(cut)})
    return pd.DataFrame(rows, columns=["seed", "speedup", "censored"])


def seed_loss_gaps(result: CellResult, method: str, reference: str) -> pd.DataFrame:
    """Per seed: ``method``'s final validation loss minus ``reference``'s, paired by seed (NaN where either run
    has no finite final loss)."""
    final = result.final
    ref, runs = final[final.method == reference].set_index("seed"), final[final.method == method].set_index("seed")
    seeds = sorted(set(ref.index) & set(runs.index))
    gaps = [float(runs.loc[s, "final_val_loss"] - ref.loc[s, "final_val_loss"]) for s in seeds]
    return pd.DataFrame({"seed": seeds, "gap": gaps}, columns=["seed", "gap"])


def _log2_fit(x: Sequence[float], y: np.ndarray) -> tuple[tuple[float, float, float], np.ndarray, np.ndarray]:
    """The least-squares slope of ``y`` on log2 ``x`` over the points where both are finite, with its 95 % t
    interval: ((slope, low, high), log2 x, y) of those points; NaNs with fewer than three points or one x."""
    x = np.log2(np.asarray(x, float))
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(np.unique(x)) < 2 or len(x) < 3:
        return (math.nan, math.nan, math.nan), x, y
    fit = scipy_stats.linregress(x, y)
    half = scipy_stats.t.ppf(0.975, len(x) - 2) * fit.stderr
    return (fit.slope, fit.slope - half, fit.slope + half), x, y


def gap_trend(x: Sequence[float], gaps: Sequence[float], margin: float = GAP_MARGIN) -> dict[str, Any]:
    """The slope of the paired final-loss gap (method - reference, nats) on log2 ``x``, in nats per doubling, with
    its 95 % t interval, and its word for a claim that the method needs fewer tokens than the reference (so a
    lower loss at the same tokens): "toward the claim" when the interval lies below 0 (the gap falls), "away"
    when above, "flat" when within ``[-margin, margin]``, else "undecided". It reads the trend of a method whose
    speed-ups are bounds (:func:`trend` cannot), from a quantity every run has."""
    (slope, low, high), x, _ = _log2_fit(x, np.asarray(gaps, float))
    if math.isnan(slope):
        return {"gap_slope": slope, "gap_low": low, "gap_high": high, "n": len(x), "trend": "undecided"}
    if high < 0:
        word = "toward the claim"
    elif low > 0:
        word = "away"
    elif -margin <= low and high <= margin:
        word = "flat"
    else:
        word = "undecided"
    return {"gap_slope": slope, "gap_low": low, "gap_high": high, "n": len(x), "trend": word}


def trend(x: Sequence[float], speedups: Sequence[float], claim: float | None,
          margin: float = TREND_MARGIN) -> dict[str, Any]:
    """The slope of log speed-up on log2 ``x`` (per doubling, as a factor) with its 95 % t interval, and its word
    relative to the claimed factor: "toward the claim" / "away" when the interval excludes 1 on that side (the
    side is where the claim lies from the mean speed-up at the largest ``x``), "flat" when the interval lies
    within ``[1/margin, margin]``, else "undecided". Without a claim (``None``) the words are "rising" and
    "falling" instead."""
    (slope, low, high), x, y = _log2_fit(x, np.log(np.asarray(speedups, float)))
    if math.isnan(slope):
        return {"slope": slope, "slope_low": low, "slope_high": high, "n": len(x), "trend": "undecided"}
    at_end = y[x == x.max()].mean()
    toward = 1.0 if claim is None or math.log(claim) >= at_end else -1.0
    if toward * low > 0:
        word = "rising" if claim is None else "toward the claim"
    elif toward * high < 0:
        word = "falling" if claim is None else "away"
    elif -math.log(margin) <= low and high <= math.log(margin):
        word = "flat"
    else:
        word = "undecided"
    return {"slope": math.exp(slope), "slope_low": math.exp(low), "slope_high": math.exp(high), "n": len(x),
            "trend": word}


def campaign_time_text(run_times: pd.DataFrame, complete: bool, budget_hours: float = CAMPAIGN_BUDGET_HOURS,
                       cores: int = 2) -> str:
    """A sentence on what the scaling campaign's own runs cost (:data:`CAMPAIGN_STUDIES` rows of
    :func:`multinorm.studies.runner.run_time_table`) against its planned budget of ``budget_hours`` on a
    ``cores``-core machine: so far, while cells are missing, or in all once ``complete``."""
    rows = run_times[run_times["study"].isin(CAMPAIGN_STUDIES)]
    core_hours, runs = float(rows["core_hours"].sum()), int(rows["runs"].sum())
    hours = core_hours / cores
    what = (f"{core_hours:.1f} core-hours over {runs} runs (its probe included; the base cell's runs are "
            f"notebook 02's; each run's wall time times its threads, so runs that shared a core with another "
            f"count in full and this bounds the machine's time from above), at most {hours:.1f} hours of a "
            f"{cores}-core machine")
    if complete:
        against = (f"at most {hours - budget_hours:.1f} hours over the {budget_hours:g} it was planned for"
                   if hours > budget_hours else f"within the {budget_hours:g} it was planned for")
        return f"The scaling campaign took {what}: {against}."
    over = f", already at most {hours - budget_hours:.1f} over" if hours > budget_hours else ""
    return (f"The scaling campaign has taken {what} so far, of the {budget_hours:g} it was planned for{over}; "
            "the cells above that are not recorded yet will add to it.")
