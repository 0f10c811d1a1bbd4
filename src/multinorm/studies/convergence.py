"""The convergence study of notebook 02: tune every method, re-run the winners over seeds, compare paired by seed.

Protocol (the notebook states it for readers; this module is its code):

1. **AdamW is tuned first**, over lr x beta2 in {0.95, 0.999}, on seed 0. Its best (lr, beta2) is the AdamW
   part (embeddings, LM head, norms) of every mixed method.
2. **Every other method is tuned on seed 0** over its own lr grid (for mixed methods: the hidden-matrix lr).
   ``adamw-split`` (AdamW on the hidden matrices at its own lr, the rest at the tuned AdamW lr) is tuned over
   lr x beta2 as well. A grid is extended by one x2 step while its best point is on an edge, so every winner
   is interior (or the extension budget is reported as spent).
3. **The winners are re-run with more seeds** (seeds change the initialisation and the data order). The
   sweep's winning run (seed 0) is one of the K reported seeds and seeds 1..K-1 are new; the optimism of a run
   that won a sweep is measured (:func:`selection_bias`: seed 0 minus the mean of the new seeds, per method and
   pooled) and reported next to the results. ``reuse_selection_seed=False`` trains K new seeds instead.
4. **The AdamW baseline** is the better (lower mean final loss over the reported seeds) of ``adamw`` and
   ``adamw-split``.
5. **Comparisons are paired by seed** (:mod:`multinorm.studies.stats`): final-loss differences with t intervals,
   token speed-ups at the baseline's loss after 50 %, 75 % and 100 % of the budget, throughput ratios.

All runs go through :func:`multinorm.studies.sweep.run_grid`, so they are cached, resumable and parallel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multinorm.studies.stats import mean_ci, product_ci, ratio_ci, token_speedup, verdict
from multinorm.studies.sweep import load_curves, run_grid
from multinorm.train import TrainConfig

__all__ = ["StudyMethod", "ConvergenceStudy", "FRACTIONS", "CLAIMS", "paired_comparisons", "selection_bias",
           "verdict_table", "bench_throughput_ratios", "bench_throughput", "results_table", "verdict_lines",
           "speedup_text", "comparison_table", "speedup_groups", "bench_ceiling", "regime_columns",
           "regime_text", "run_parameters", "TREND_COLUMNS", "optimizer_ceiling", "speedup_verdict"]

FRACTIONS = (0.5, 0.75, 1.0)
ADAMW_BETA2 = (0.95, 0.999)


@dataclass(frozen=True)
class StudyMethod:
    """A method of the study: a registry optimizer with fixed settings, an lr grid and a number of seeds.

    ``rest_adamw``: the method trains embeddings/head/norms with the tuned AdamW (lr and betas).
    ``tune_beta2``: the grid is crossed with beta2 in {0.95, 0.999} (AdamW's two forms).
    """

    name: str
    optimizer: str
    grid: tuple[float, ...]
    seeds: int = 3
    hparams: dict[str, Any] = field(default_factory=dict)
    rest_adamw: bool = True
    tune_beta2: bool = False


def _grid_row(method: StudyMethod, lr: float, seed: int, hparams: dict[str, Any]) -> dict[str, Any]:
    return {"optimizer": method.optimizer, "lr": lr, "seed": seed, "hparams": hparams, "tag": method.name}


class ConvergenceStudy:
    """Runs the protocol of the module docstring in one results folder.

    ``base`` holds the regime (model, data, budget, evaluation); ``mode`` and ``jobs`` are those of
    :func:`multinorm.studies.sweep.run_grid`. Every batch of independent runs is one ``run_grid`` call, so ``jobs``
    workers stay busy.
    """

    def __init__(self, base: TrainConfig, runs_dir: str | Path, *, mode: str = "train", jobs: int = 1,
                 max_extensions: int = 3, progress: bool = True):
        self.base, self.runs_dir, self.mode, self.jobs = base, Path(runs_dir), mode, jobs
        self.max_extensions, self.progress = max_extensions, progress
        self.adamw: dict[str, Any] | None = None  # tuned {"lr", "beta2"}

    def _run(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        if not rows:
            return pd.DataFrame()
        table = run_grid(self.base, rows, self.runs_dir, mode=self.mode, jobs=self.jobs, progress=self.progress)
        table["method"] = [r["tag"] for r in rows]
        table["beta2"] = [r["hparams"].get("adam_betas", (0.9, 0.999))[1] for r in rows]
        return table

    def _variants(self, method: StudyMethod) -> list[dict[str, Any]]:
        hp = dict(method.hparams)
        if method.rest_adamw and self.adamw is not None:
            hp["adam_lr"] = self.adamw["lr"]
            hp["adam_betas"] = (0.9, self.adamw["beta2"])
        if method.tune_beta2:
            return [{**hp, "adam_betas": (0.9, b2)} for b2 in ADAMW_BETA2]
        return [hp]

    def tune(self, methods: Sequence[StudyMethod], seed: int = 0) -> pd.DataFrame:
        """Sweep every method's grid on ``seed`` with edge extensions; one batch of runs per round.

        A method tuned over beta2 is extended for each beta2 whose best lr is on an edge, so both of AdamW's
        forms end at an interior optimum (or with the extension budget spent), not only the winning one."""
        pending = [(m, lr, hp) for m in methods for lr in sorted(set(m.grid)) for hp in self._variants(m)]
        done: list[pd.DataFrame] = []
        for round_ in range(self.max_extensions + 1):
            done.append(self._run([_grid_row(m, lr, seed, hp) for m, lr, hp in pending]))
            table = pd.concat(done, ignore_index=True)
            if round_ == self.max_extensions:
                break
            pending = []
            for m in methods:
                for hp in self._variants(m):
                    beta2 = hp.get("adam_betas", (0.9, 0.999))[1]
                    rows = table[table.method == m.name]
                    new = _extension(rows[rows.beta2 == beta2] if m.tune_beta2 else rows)
                    if new is not None:
                        pending.append((m, new, hp))
            if not pending:
                break
        return pd.concat(done, ignore_index=True)

    def tune_adamw(self, method: StudyMethod) -> pd.DataFrame:
        """Tune plain AdamW over lr x beta2 and remember the winner for the mixed methods."""
        if not method.tune_beta2 or method.rest_adamw:
            raise ValueError("the AdamW method must have tune_beta2=True and rest_adamw=False")
        table = self.tune([method])
        best = best_config(table).iloc[0]
        self.adamw = {"lr": float(best.lr), "beta2": float(best.beta2)}
        return table

    def seeds(self, methods: Sequence[StudyMethod], sweep: pd.DataFrame, *,
              reuse_selection_seed: bool = True) -> pd.DataFrame:
        """Every method at its tuned (lr, beta2) on ``method.seeds`` seeds.

        With ``reuse_selection_seed`` the sweep's winning run (seed 0) counts as one of them and seeds
        1..K-1 are trained; the optimism of a selected run is then estimated by :func:`selection_bias`.
        Without it, seeds 1..K are all trained and no reported number comes from the selection.
        """
        best = best_config(sweep).set_index("method")
        rows, kept = [], []
        for m in methods:
            b = best.loc[m.name]
            hp = next(h for h in self._variants(m)
                      if h.get("adam_betas", (0.9, 0.999))[1] == b.beta2 or not m.tune_beta2)
            winner = sweep[(sweep.method == m.name) & (sweep.lr == b.lr) & (sweep.beta2 == b.beta2)
                           & (sweep.seed == 0)]
            if reuse_selection_seed and len(winner):
                kept.append(winner.iloc[:1])
                rows += [_grid_row(m, float(b.lr), s, hp) for s in range(1, m.seeds)]
            else:
                rows += [_grid_row(m, float(b.lr), s, hp) for s in range(1, m.seeds + 1)]
        fresh = self._run(rows)
        return pd.concat([*kept, fresh], ignore_index=True).sort_values(["method", "seed"], ignore_index=True)


def selection_bias(final: pd.DataFrame, selection_seed: int = 0) -> pd.DataFrame:
    """How optimistic the selection seed's run is: per method, its final loss minus the mean of the other seeds,
    and (method ``"all methods"``) the mean of those differences with its 95 % t interval over methods, then the
    same mean without the method of the largest difference (method ``"all methods but <name>"``), so a pooled
    value that one method drives reads as such.

    A method whose runs are another's (the same final loss on every seed, e.g. a split-lr AdamW that chose
    AdamW's own lr) is counted once. A negative value means the run that won the lr sweep also drew a lucky seed
    (the winner's curse); an interval that contains 0 means reusing it as a reported seed biases nothing this
    study can resolve.
    """
    rows, seen = [], []
    for method, runs in final.groupby("method", sort=False):
        losses = runs.set_index("seed").final_val_loss.sort_index()
        if any(len(losses) == len(other) and (losses.index == other.index).all() and (losses == other).all()
               for other in seen):
            continue
        seen.append(losses)
        chosen = runs[runs.seed == selection_seed].final_val_loss
        others = runs[runs.seed != selection_seed].final_val_loss
        if len(chosen) and len(others) and np.isfinite(chosen.iloc[0]) and np.isfinite(others).all():
            rows.append({"method": method, "estimate": float(chosen.iloc[0] - others.mean()), "ci_low": math.nan,
                         "ci_high": math.nan, "n": len(others)})
    table = pd.DataFrame(rows, columns=["method", "estimate", "ci_low", "ci_high", "n"])
    methods = table.copy()
    if len(methods) >= 2:
        ci = mean_ci(methods.estimate.to_numpy())
        table.loc[len(table)] = {"method": "all methods", "estimate": ci.estimate, "ci_low": ci.low,
                                 "ci_high": ci.high, "n": ci.n}
    if len(methods) >= 3:
        largest = methods.loc[methods.estimate.abs().idxmax()]
        ci = mean_ci(methods[methods.method != largest.method].estimate.to_numpy())
        table.loc[len(table)] = {"method": f"all methods but {largest.method}", "estimate": ci.estimate,
                                 "ci_low": ci.low, "ci_high": ci.high, "n": ci.n}
    return table


def _extension(table: pd.DataFrame) -> float | None:
    """The next lr to try when the best lr of ``table`` (lowest final loss, finite) is on an edge of its grid
    for the best beta2; None when it is interior, or the grid is a single point (e.g. the lr-0 control)."""
    ok = table[np.isfinite(table.final_val_loss)]
    if ok.empty:
        return None
    best = ok.loc[ok.final_val_loss.idxmin()]
    lrs = sorted(table[table.beta2 == best.beta2].lr.unique())
    if len(lrs) < 2 or lrs[0] < best.lr < lrs[-1]:
        return None
    step = lrs[1] / lrs[0] if best.lr == lrs[0] else lrs[-1] / lrs[-2]
    return float(best.lr / step if best.lr == lrs[0] else best.lr * step)


def best_config(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per method, the (lr, beta2) with the lowest final validation loss (mean over the seeds run)."""
    mean = sweep.groupby(["method", "beta2", "lr"], as_index=False).final_val_loss.mean()
    return mean.loc[mean.groupby("method").final_val_loss.idxmin()].reset_index(drop=True)


def interior(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per method: the best lr, the grid run (at the best beta2) and whether the best lr is interior -- for a
    method tuned over beta2, whether it is interior for *every* beta2 (column ``edges`` lists the beta2 values
    whose best lr is on an edge of their grid)."""
    rows = []
    for _, b in best_config(sweep).iterrows():
        runs = sweep[sweep.method == b.method]
        edges = []
        for beta2, d in runs.groupby("beta2"):
            lrs = sorted(d.lr.unique())
            best = best_config(d).iloc[0].lr
            if len(lrs) > 1 and not lrs[0] < best < lrs[-1]:
                edges.append(f"{beta2:g}")
        lrs = sorted(runs[runs.beta2 == b.beta2].lr.unique())
        rows.append({"method": b.method, "lr": b.lr, "beta2": b.beta2, "grid": " ".join(f"{x:g}" for x in lrs),
                     "interior": not edges, "edges": " ".join(edges)})
    return pd.DataFrame(rows)


def _curve(curves: pd.DataFrame, run_id: str) -> tuple[np.ndarray, np.ndarray]:
    c = curves[curves.run_id == run_id].sort_values("tokens")
    return c.tokens.to_numpy(float), c.val_loss.to_numpy(float)


def paired_comparisons(final: pd.DataFrame, curves: pd.DataFrame, reference: str,
                       fractions: Sequence[float] = FRACTIONS) -> pd.DataFrame:
    """Every method against ``reference``, paired by seed: final-loss difference (method - reference), token
    speed-ups at the reference's loss after each fraction of its budget, and raw throughput ratio.

    Columns: method, reference, quantity, estimate, ci_low, ci_high, n, censored. Diverged runs have no
    curve to compare: a method with any diverged seed gets NaN rows.
    """
    ref = final[final.method == reference].set_index("seed")
    rows = []
    for method, runs in final.groupby("method", sort=False):
        if method == reference:
            continue
        runs = runs.set_index("seed")
        seeds = sorted(set(runs.index) & set(ref.index))
        ok = [s for s in seeds if np.isfinite(runs.loc[s, "final_val_loss"]) and np.isfinite(ref.loc[s, "final_val_loss"])]

        def add(quantity: str, interval, censored: int = 0) -> None:
            est, lo, hi, n = ((interval.estimate, interval.low, interval.high, interval.n) if interval is not None
                              else (math.nan, math.nan, math.nan, len(ok)))
            rows.append({"method": method, "reference": reference, "quantity": quantity, "estimate": est,
                         "ci_low": lo, "ci_high": hi, "n": n, "censored": censored})

        complete = len(ok) == len(seeds) and len(ok) > 0
        add("final_loss_diff", mean_ci([runs.loc[s, "final_val_loss"] - ref.loc[s, "final_val_loss"] for s in ok])
            if complete else None)
        for f in fractions:
            values, censored = [], 0
            for s in ok:
                value, cut = token_speedup(*_curve(curves, ref.loc[s, "run_id"]), *_curve(curves, runs.loc[s, "run_id"]), f)
                values.append(value)
                censored += cut
            add(f"speedup_{int(round(f * 100))}", ratio_ci(values) if complete else None, censored)
        add("throughput_ratio", ratio_ci([runs.loc[s, "tokens_per_s"] / ref.loc[s, "tokens_per_s"] for s in ok])
            if complete else None)
    return pd.DataFrame(rows)


# The papers' claims checked by the study: (claim, paper value as printed, claimed factor used for the verdict,
# method, reference, quantity). "baseline" is the AdamW baseline; effective throughput = speed-up x raw ratio.
CLAIMS = (
    ("SWAN reaches Adam's loss with 2x fewer tokens", "2x (350M, 1.3B)", 2.0, "swan", "baseline", "speedup_100"),
    ("SinkGD reaches Adam's loss with 2.4-2.8x fewer tokens", "2.4x (350M), 2.8x (1.3B)", 2.4, "sinkgd", "baseline",
     "speedup_100"),
    ("SinkGD reaches SWAN's loss with 1.3-1.5x fewer tokens", "1.3x (350M), 1.5x (1.3B)", 1.3, "sinkgd", "swan",
     "speedup_100"),
    ("SinkGD's raw throughput is 1.09x Adam's", "58.0K / 53.0K tokens/s = 1.09x", 1.09, "sinkgd", "baseline",
     "throughput_ratio"),
    ("SinkGD's effective throughput is 3x Adam's", "161.8K / 53.0K tokens/s = 3.05x", 3.0, "sinkgd", "baseline",
     "effective_throughput"),
)


def bench_throughput_ratios(raw_times: pd.DataFrame, method: str, reference: str = "adamw") -> np.ndarray:
    """Per round of the interleaved training benchmark (``make bench``, ``results/bench/raw_times.csv``):
    tokens/s of ``method`` over tokens/s of ``reference``, both timed in the same round on an idle machine."""
    t = raw_times[raw_times.table == "train_throughput"]
    wide = t.pivot_table(index="round", columns="name", values="seconds")
    if not {method, reference} <= set(wide.columns):
        raise ValueError(f"the training benchmark has no {method!r} and {reference!r} rows")
    return (wide[reference] / wide[method]).to_numpy(float)


def _speedups(final: pd.DataFrame, curves: pd.DataFrame, method: str, reference: str) -> tuple[list, list, int]:
    """Seeds, speed-ups at 100 % and how many of them are censored (bounds)."""
    ref, runs = final[final.method == reference].set_index("seed"), final[final.method == method].set_index("seed")
    seeds = sorted(set(ref.index) & set(runs.index))
    pairs = [token_speedup(*_curve(curves, ref.loc[s, "run_id"]), *_curve(curves, runs.loc[s, "run_id"]), 1.0)
             for s in seeds]
    return seeds, [value for value, _ in pairs], sum(bool(cut) for _, cut in pairs)


def effective_throughput(final: pd.DataFrame, curves: pd.DataFrame, method: str, reference: str,
                         throughput: Sequence[float] | None = None):
    """(Token speed-up at 100 %) x (raw throughput ratio), with its log-scale interval.

    With ``throughput`` (per-round ratios from :func:`bench_throughput_ratios`) the two independent samples
    are combined by :func:`multinorm.studies.stats.product_ci`; without it each seed's speed-up is multiplied by the
    same seed's tokens/s ratio from the run records."""
    seeds, speed, _ = _speedups(final, curves, method, reference)
    if not seeds:
        return None
    if throughput is not None:
        return product_ci(speed, throughput)
    ref, runs = final[final.method == reference].set_index("seed"), final[final.method == method].set_index("seed")
    return ratio_ci([v * runs.loc[s, "tokens_per_s"] / ref.loc[s, "tokens_per_s"] for s, v in zip(seeds, speed)])


def verdict_table(final: pd.DataFrame, curves: pd.DataFrame, baseline: str,
                  throughput: dict[str, Sequence[float]] | None = None,
                  ceilings: dict[str, float] | None = None) -> pd.DataFrame:
    """``claim, paper, ours, ci_low, ci_high, n, censored, reference, source, verdict`` for every entry of
    :data:`CLAIMS`.

    ``throughput`` maps a method to its per-round tokens/s ratios over AdamW from the training benchmark
    (:func:`bench_throughput_ratios`); the throughput claims of such a method use them (an idle machine,
    interleaved rounds) instead of the study runs' own tokens/s, which parallel workers share the cores for.
    A speed-up whose every seed is censored at a bound <= 1 (the method never reached the reference's loss within
    the budget) is "contradicted", although its interval of bounds touches 1. ``ceilings`` maps a method to the
    largest tokens/s ratio over AdamW the setting allows (:func:`bench_ceiling`): a raw-throughput claim above it is
    "not testable here" (column ``ceiling``).
    """
    throughput, ceilings = throughput or {}, ceilings or {}
    rows = []
    for claim, paper, factor, method, reference, quantity in CLAIMS:
        reference = baseline if reference == "baseline" else reference
        if not {method, reference} <= set(final.method):
            continue
        censored, source = 0, "study runs"
        bench = throughput.get(method) if quantity != "final_loss_diff" else None
        if quantity == "throughput_ratio" and bench is not None:
            ci, source = ratio_ci(bench), "make bench"
            est, lo, hi, n = ci.estimate, ci.low, ci.high, ci.n
        elif quantity == "effective_throughput":
            ci = effective_throughput(final, curves, method, reference, bench)
            source = "study runs x make bench" if bench is not None else source
            est, lo, hi, n = (ci.estimate, ci.low, ci.high, ci.n) if ci else (math.nan,) * 3 + (0,)
            seeds, _, censored = _speedups(final, curves, method, reference)  # the speed-ups that are bounds
            n = len(seeds) if ci else 0
        else:
            table = paired_comparisons(final[final.method.isin([method, reference])], curves, reference)
            r = table[(table.method == method) & (table.quantity == quantity)].iloc[0]
            est, lo, hi, n, censored = r.estimate, r.ci_low, r.ci_high, r.n, r.censored
        ceiling = ceilings.get(method) if quantity == "throughput_ratio" else None
        word = speedup_verdict(lo, hi, factor, n, censored, ceiling)
        rows.append({"claim": claim, "paper": paper, "ours": est, "ci_low": lo, "ci_high": hi, "n": n,
                     "censored": censored, "reference": reference, "source": source,
                     "ceiling": math.nan if ceiling is None else ceiling, "verdict": word})
    return pd.DataFrame(rows)


def speedup_verdict(low: float, high: float, claim: float, n: int = 0, censored: int = 0,
                    ceiling: float | None = None) -> str:
    """:func:`~multinorm.studies.stats.verdict` for a claimed factor, where ``censored`` of the ``n`` seeds'
    speed-ups are bounds: when every one is a bound <= 1 (no seed reached the reference's loss within the
    budget) the claim is "contradicted", although the interval of the bounds touches 1."""
    word = verdict(low, high, claim, ceiling)
    return "contradicted" if n and censored == n and high <= 1.0 else word


def optimizer_ceiling(profile: pd.DataFrame, method: str = "sinkgd", baseline: str = "adamw") -> pd.DataFrame:
    """What the optimizer phase of a training step allows the tokens/s ratio ``method / baseline`` to be, per
    device and dtype, from the torch.profiler breakdown: ``ceiling`` if ``method``'s step cost nothing
    (T / (T - opt_baseline)) and ``predicted`` with its measured optimizer phase (T / (T - opt_baseline +
    opt_method)), T being the baseline's whole step. Forward, backward and evaluation are the same work for
    both, so any ratio beyond these bounds is noise. Per thread count too, where the profile has one."""
    keys = ["model", "device", "dtype"] + (["threads"] if "threads" in profile else [])
    total = profile.groupby(["optimizer", *keys], sort=False)["ms_per_step"].sum()
    opt = profile[profile["phase"] == "optimizer"].set_index(["optimizer", *keys])["ms_per_step"]
    if not {method, baseline} <= set(opt.index.get_level_values(0)):
        return pd.DataFrame(columns=[*keys, "step_ms", "baseline_optimizer_ms", "method_optimizer_ms", "ceiling",
                                     "predicted"])
    frame = pd.concat({"step_ms": total.loc[baseline], "baseline_optimizer_ms": opt.loc[baseline],
                       "method_optimizer_ms": opt.loc[method]}, axis=1).dropna()
    rest = frame["step_ms"] - frame["baseline_optimizer_ms"]
    return frame.assign(ceiling=frame["step_ms"] / rest,
                        predicted=frame["step_ms"] / (rest + frame["method_optimizer_ms"])).reset_index()


def bench_ceiling(bench_dir: str | Path, base: TrainConfig, method: str = "sinkgd",
                  baseline: str = "adamw") -> float | None:
    """The largest tokens/s ratio ``method / baseline`` a training step of this regime allows (at one thread, as
    the study's runs train), from ``make bench``'s profile (:func:`optimizer_ceiling`: the ratio if ``method``'s optimizer phase cost nothing); None when the
    benchmark did not profile this regime."""
    path = Path(bench_dir) / "train_profile.csv"
    if not path.exists():
        return None
    profile = pd.read_csv(path)
    same = profile[(profile.model == base.model) & (profile.device == base.device)
                   & (profile.vocab_size == base.vocab_size) & (profile.batch_size == base.batch_size)
                   & (profile.seq_len == base.seq_len)]
    if "threads" in same:  # the study trains each run on one thread
        same = same[same.threads == 1]
    table = optimizer_ceiling(same, method, baseline)
    return float(table.ceiling.max()) if len(table) else None


def regime_columns(cfg: TrainConfig, parameters: dict[str, int]) -> dict[str, Any]:
    """The regime a verdict holds in, as columns: parameters, width, tokens per step, steps, tokens per
    parameter (``parameters``: the ``"total"`` count of a run record and the model's ``"width"``)."""
    return {"model": cfg.model, "parameters": parameters["total"], "width": parameters["width"],
            "tokens_per_step": cfg.tokens_per_step, "steps": cfg.steps,
            "tokens_per_parameter": cfg.steps * cfg.tokens_per_step / parameters["total"]}


def run_parameters(run_dir: str | Path) -> dict[str, int]:
    """``{"total", "hidden", "width"}`` of the model a run trained, from its ``config.json``."""
    from multinorm.llama import MODEL_CONFIGS

    record = json.loads((Path(run_dir) / "config.json").read_text())
    counts = record["parameters"]
    return {"total": counts["total"], "hidden": counts["hidden"],
            "width": MODEL_CONFIGS[record["config"]["model"]].hidden_size}


def seed_curves(final: pd.DataFrame, runs_dir: str | Path) -> pd.DataFrame:
    """Validation curves of the reported runs with their method and seed."""
    curves = load_curves(runs_dir, final.run_id)
    return curves.merge(final[["run_id", "method", "seed"]], on="run_id")


def mean_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Per method and token count: mean validation loss over seeds and its 95 % t interval."""
    rows = []
    for (method, tokens), d in curves.groupby(["method", "tokens"]):
        ci = mean_ci(d.val_loss.to_numpy())
        rows.append({"method": method, "tokens": tokens, "mean": ci.estimate, "ci_low": ci.low, "ci_high": ci.high,
                     "n": ci.n})
    return pd.DataFrame(rows)


def bench_throughput(bench_dir: str | Path, base: TrainConfig,
                     methods: Sequence[str] = ("sinkgd", "swan")) -> dict[str, np.ndarray]:
    """Per-round tokens/s ratios (method / AdamW) from ``make bench``, if its training benchmark measured this
    regime (same model, device, vocabulary, batch and sequence length); else ``{}``.

    The benchmark interleaves the optimizers round by round on an idle machine; the study's own runs may have
    shared the cores with a parallel worker, so their tokens/s are only the fallback of :func:`verdict_table`.
    """
    bench_dir = Path(bench_dir)
    table, raw = bench_dir / "train_throughput.csv", bench_dir / "raw_times.csv"
    if not (table.exists() and raw.exists()):
        return {}
    measured = pd.read_csv(table)
    if "vocab_size" not in measured:  # written before the benchmark recorded its vocabulary
        return {}
    same = measured[(measured.model == base.model) & (measured.device == base.device)
                    & (measured.vocab_size == base.vocab_size) & (measured.batch_size == base.batch_size)
                    & (measured.seq_len == base.seq_len)]
    raw_times = pd.read_csv(raw)
    return {m: bench_throughput_ratios(raw_times, m) for m in methods if m in set(same.optimizer)}


def _with_ci(row: Any, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(row.estimate)} [{fmt.format(row.ci_low)}, {fmt.format(row.ci_high)}]"


def speedup_text(estimate: float, low: float, high: float, n: int, censored: int, times: str = "") -> str:
    """A token speed-up for reading: ``1.45 [1.37, 1.53]``; with censored seeds (which never reached the target
    within the budget, so their bound stands in for a smaller value) ``≤ 0.87 [0.77, 0.98] (1/5 not reached)``,
    and ``< 1.00 (5/5 not reached)`` when no seed reached it (the interval of equal bounds says nothing more)."""
    if n and censored == n:
        return f"< {high:.2f}{times} ({censored}/{n} not reached)"
    text = f"{estimate:.2f}{times} [{low:.2f}, {high:.2f}]"
    return f"≤ {text} ({censored}/{n} not reached)" if censored else text


def regime_text(row: Any) -> str:
    """A regime (:func:`regime_columns`) in one phrase: ``1.07 M parameters (width 128), 768 steps × 2,048 tokens,
    1.5 tokens/parameter``."""
    return (f"{row.parameters / 1e6:.2f} M parameters (width {int(row.width)}), {int(row.steps)} steps × "
            f"{int(row.tokens_per_step):,} tokens, {row.tokens_per_parameter:.1f} tokens/parameter")


# Trend columns of a verdict table (written by the scaling study) and their README headers.
TREND_COLUMNS = {"trend_batch": "trend as the batch grows", "trend_width": "trend as the width grows"}


def comparison_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    """:func:`verdict_table` for README: the references by name and ``ours`` with its interval in one column
    (:func:`speedup_text`, so a bound from censored seeds reads as one), the regime when the table has its
    columns (:func:`regime_columns`) and the trends when it has them (:data:`TREND_COLUMNS`)."""
    from multinorm.studies.report import method_label

    ours = [speedup_text(v.ours, v.ci_low, v.ci_high, int(v.n), int(v.censored)) for v in verdicts.itertuples()]
    table = pd.DataFrame({"claim": verdicts.claim, "paper": verdicts.paper, "ours [95 % CI]": ours,
                          "seeds or rounds": verdicts.n, "reference": verdicts.reference.map(method_label),
                          "source": verdicts.source, "verdict": verdicts.verdict})
    if "parameters" in verdicts:
        table.insert(3, "regime", [regime_text(v) for v in verdicts.itertuples()])
    for column, header in TREND_COLUMNS.items():
        if column in verdicts:
            table[header] = verdicts[column].fillna("–").to_numpy()
    return table


def speedup_groups(comparisons: pd.DataFrame, quantity: str = "speedup_100") -> dict[str, list[str]]:
    """The methods of :func:`paired_comparisons` grouped by what one token speed-up says: ``faster`` (interval
    above 1, no censored seed), ``slower`` (interval below 1), ``never reached`` (no seed reached the target within
    the budget: slower on every seed, by an unknown amount) and ``undecided`` (interval containing 1, or above 1
    only through bounds)."""
    groups: dict[str, list[str]] = {"faster": [], "slower": [], "never reached": [], "undecided": []}
    for r in comparisons[comparisons.quantity == quantity].itertuples():
        if not np.isfinite(r.ci_low):
            continue
        if r.n and r.censored == r.n:
            groups["never reached"].append(r.method)
        elif r.ci_high < 1:
            groups["slower"].append(r.method)
        elif r.ci_low > 1 and not r.censored:
            groups["faster"].append(r.method)
        else:
            groups["undecided"].append(r.method)
    return groups


def results_table(final: pd.DataFrame, comparisons: pd.DataFrame, methods: Sequence[str],
                  baseline: str) -> pd.DataFrame:
    """One row per method for README: tuned lr, seeds, mean final loss, and against the baseline the paired
    final-loss difference, the token speed-ups at each target and the tokens/s ratio, each ``estimate [95 % CI]``
    (with the number of censored seeds, which never reached a target, where there are any)."""
    from multinorm.studies.report import method_label

    rows = []
    for method in methods:
        runs = final[final.method == method]
        c = comparisons[comparisons.method == method].set_index("quantity")
        row = {"method": method_label(method), "lr": runs.lr.iloc[0], "seeds": len(runs),
               "final val loss": runs.final_val_loss.mean()}
        if method == baseline:
            row.update({"Δ loss vs baseline": "(baseline)", **{f"speed-up @{int(f * 100)}%": "–" for f in FRACTIONS},
                        "tokens/s ratio": "–"})
        else:
            row["Δ loss vs baseline"] = _with_ci(c.loc["final_loss_diff"], "{:+.3f}")
            for f in FRACTIONS:
                q = c.loc[f"speedup_{int(f * 100)}"]
                row[f"speed-up @{int(f * 100)}%"] = speedup_text(q.estimate, q.ci_low, q.ci_high, int(q.n),
                                                                 int(q.censored))
            row["tokens/s ratio"] = _with_ci(c.loc["throughput_ratio"])
        rows.append(row)
    return pd.DataFrame(rows)


def verdict_lines(verdicts: pd.DataFrame, grids: pd.DataFrame, regime: pd.DataFrame,
                  pooled_bias: Any | None = None, leave_out: Any | None = None) -> list[str]:
    """README bullets: one per claim (ours with its interval, the verdict), then whether every tuned lr is
    interior, the pooled selection bias (rows ``"all methods"`` and ``"all methods but ..."`` of
    :func:`selection_bias`) and the regime checks R1-R3."""
    from multinorm.studies.report import method_label

    lines = []
    for v in verdicts.itertuples():
        n, censored, ref = int(getattr(v, "n", 0) or 0), int(getattr(v, "censored", 0) or 0), method_label(v.reference)
        if v.verdict == "not testable here":
            lines.append(f"* {v.claim} (paper: {v.paper}): ours **{v.ours:.2f}×** [{v.ci_low:.2f}, {v.ci_high:.2f}] vs "
                         f"{ref}, but this setting can show at most **{v.ceiling:.3f}×** (the ratio if the method's "
                         f"optimizer step cost nothing) → **{v.verdict}**.")
            continue
        if n and censored == n:
            ours = f"**< {v.ci_high:.2f}×** ({censored}/{n} seeds never reached {ref}'s loss within the budget)"
        else:
            ours = f"**{'≤ ' if censored else ''}{v.ours:.2f}×** [{v.ci_low:.2f}, {v.ci_high:.2f}] vs {ref}"
            ours += f" ({censored}/{n} seeds never reached it: their bounds used)" if censored else ""
        lines.append(f"* {v.claim} (paper: {v.paper}): ours {ours} → **{v.verdict}**.")
    edges = grids[~grids.interior.astype(bool)]
    def named(r: Any) -> str:
        beta2 = getattr(r, "edges", "")
        return method_label(r.method) + (f" (β₂ {beta2})" if isinstance(beta2, str) and beta2 else "")

    lines.append("* Every tuned lr is an interior point of its grid (for AdamW's two forms: at each β₂)." if edges.empty
                 else "* Best lr on an edge of its grid after the allowed extensions: "
                 + ", ".join(named(r) for r in edges.itertuples()) + ".")
    if pooled_bias is not None:
        b = pooled_bias
        count = f"{int(b.n)} distinct methods" if "n" in b else "methods"
        lines.append(f"* Selection bias of the reused sweep run (seed 0 minus the other seeds, pooled over "
                     f"{count}): {b.estimate:+.3f} [{b.ci_low:+.3f}, {b.ci_high:+.3f}] nats"
                     + (" — not distinguishable from 0" if b.ci_low <= 0 <= b.ci_high else "")
                     + (f"; without {method_label(leave_out.method.removeprefix('all methods but '))}, the largest, "
                        f"{leave_out.estimate:+.3f} [{leave_out.ci_low:+.3f}, {leave_out.ci_high:+.3f}]"
                        if leave_out is not None else "") + ".")
    checks = regime[regime.quantity.str.startswith("R")]
    lines.append("* Regime checks: " + "; ".join(f"{r.quantity} = {r.value:.3g} ({'met' if r.met else 'NOT met'})"
                                                 for r in checks.itertuples()) + ".")
    return lines
