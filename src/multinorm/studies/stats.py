"""Comparisons over seeds: paired confidence intervals, token speed-ups and the five verdict words.

Every comparison in the studies is *paired by seed*: a method and the baseline trained with the same seed
share the initialisation and the data order, so ``method(seed) - baseline(seed)`` removes most of the
seed-to-seed variation that unpaired means would carry. With n seeds the 95 % interval is Student's t
interval of the n paired values (``scipy.stats.ttest_1samp(...).confidence_interval``); ratios (speed-ups,
throughput) are averaged on the log scale, so their interval is that of the geometric mean.

Token speed-up, the papers' way: for a target loss ``y``, ``S = T_baseline(y) / T_method(y)`` where ``T(y)``
is the number of training tokens after which a validation curve first reaches ``y`` (linear interpolation
between evaluations). The targets are the baseline's own loss at 50 %, 75 % and 100 % of the budget. A
method that never reaches ``y`` within the budget is *censored*: its speed-up is below
``T_baseline(y) / budget``, and that bound is used (so a censored value never makes a method look slower
than it is, and the count of censored seeds is reported next to every interval).

Verdict of a claimed factor ``c`` (> 1) from the interval ``[lo, hi]`` of the measured factor:

    contradicted     hi < 1             the method is slower (or the effect goes the other way)
    not reproduced   lo <= 1 <= hi      no effect can be told from none
    reproduced       lo > 1, hi >= c    faster, and the claimed factor is within (or below) the interval
    partly           lo > 1, hi < c     faster, by less than claimed
    not testable here  ceiling < c      the largest value this setting can show is below the claim (e.g. a
                                        throughput ratio capped by the optimizer's share of a step), whatever
                                        the interval
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

__all__ = ["Interval", "mean_ci", "ratio_ci", "product_ci", "tokens_to_reach", "loss_at", "token_speedup", "verdict", "VERDICTS"]

VERDICTS = ("reproduced", "partly", "not reproduced", "contradicted", "not testable here")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval over ``n`` seeds."""

    estimate: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}] (n={self.n})"


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of ``values`` with Student's t interval (for paired differences: method - baseline per seed).

    With one value the interval is unbounded (nothing is known about the spread); with zero spread it is the
    point itself. Non-finite values raise ValueError, since a diverged run must be handled by the caller.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_ci got non-finite values: {x.tolist()}")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    if np.ptp(x) == 0.0:
        return Interval(float(x[0]), float(x[0]), float(x[0]), int(x.size))
    ci = sps.ttest_1samp(x, 0.0).confidence_interval(confidence_level=level)
    return Interval(mean, float(ci.low), float(ci.high), int(x.size))


def ratio_ci(ratios: Sequence[float], level: float = 0.95) -> Interval:
    """Geometric mean of positive ratios with the t interval computed on their logarithms."""
    r = np.asarray(ratios, dtype=float)
    if r.size and not np.all(r > 0):
        raise ValueError(f"ratio_ci needs positive ratios, got {r.tolist()}")
    log = mean_ci(np.log(r), level)
    return Interval(math.exp(log.estimate), math.exp(log.low), math.exp(log.high), log.n)


def tokens_to_reach(tokens: Sequence[float], losses: Sequence[float], target: float) -> float:
    """First token count at which a validation curve reaches ``target`` (linear interpolation between
    evaluations); NaN if it never does. The curve is a list of (tokens, loss) evaluations in order."""
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(losses, dtype=float)
    hit = np.flatnonzero(y <= target)
    if hit.size == 0:
        return math.nan
    i = int(hit[0])
    if i == 0:
        return float(t[0])
    # the curve crosses target between evaluation i-1 (above) and i (at or below)
    frac = (y[i - 1] - target) / (y[i - 1] - y[i])
    return float(t[i - 1] + frac * (t[i] - t[i - 1]))


def loss_at(tokens: Sequence[float], losses: Sequence[float], at: float) -> float:
    """The curve's loss at token count ``at`` (linear interpolation between evaluations)."""
    t = np.asarray(tokens, dtype=float)
    if not t[0] <= at <= t[-1]:
        raise ValueError(f"{at:g} tokens is outside the curve's range [{t[0]:g}, {t[-1]:g}]")
    return float(np.interp(at, t, np.asarray(losses, dtype=float)))


def token_speedup(base_tokens: Sequence[float], base_losses: Sequence[float], tokens: Sequence[float],
                  losses: Sequence[float], fraction: float = 1.0) -> tuple[float, bool]:
    """``(S, censored)``: the token speed-up of a curve over the baseline's curve at the baseline's loss after
    ``fraction`` of its budget. ``censored`` is True when the method never reaches that loss; ``S`` is then
    the upper bound ``T_baseline / budget``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    budget = float(base_tokens[-1])
    target = loss_at(base_tokens, base_losses, fraction * budget)
    t_base = tokens_to_reach(base_tokens, base_losses, target)
    t_method = tokens_to_reach(tokens, losses, target)
    if math.isnan(t_method):
        return t_base / float(tokens[-1]), True
    if t_method == 0.0:
        # Reached at the first evaluation: with a target no lower than the starting loss (a baseline that did
        # not improve) both curves start there, S = 1; otherwise the method got there before its next
        # evaluation, and that evaluation's token count bounds S from below (the curve's resolution).
        return (1.0 if t_base == 0.0 else t_base / float(tokens[1])), False
    return t_base / t_method, False


def verdict(low: float, high: float, claim: float, ceiling: float | None = None) -> str:
    """One of :data:`VERDICTS` for a claimed factor ``claim`` > 1 and the interval [low, high] (see module doc);
    ``ceiling``, where known, is the largest factor the setting can show at all."""
    if not claim > 1.0:
        raise ValueError(f"a claimed factor must be > 1, got {claim}")
    if ceiling is not None and ceiling < claim:
        return "not testable here"
    if math.isnan(low) or math.isnan(high):
        return "not reproduced"
    if high < 1.0:
        return "contradicted"
    if low <= 1.0:
        return "not reproduced"
    return "reproduced" if high >= claim else "partly"


def product_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Geometric mean of ``a`` times that of ``b``, two independent samples of positive ratios (e.g. per-seed
    token speed-ups and per-round throughput ratios), with a Welch-Satterthwaite t interval on the log scale.
    ``n`` is the smaller sample's size."""
    la, lb = np.log(np.asarray(a, dtype=float)), np.log(np.asarray(b, dtype=float))
    if la.size < 2 or lb.size < 2 or not (np.all(np.isfinite(la)) and np.all(np.isfinite(lb))):
        raise ValueError("product_ci needs at least two finite positive ratios in each sample")
    va, vb = la.var(ddof=1) / la.size, lb.var(ddof=1) / lb.size
    estimate = float(la.mean() + lb.mean())
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Interval(math.exp(estimate), math.exp(estimate), math.exp(estimate), int(min(la.size, lb.size)))
    df = (va + vb) ** 2 / (va ** 2 / (la.size - 1) + vb ** 2 / (lb.size - 1))
    half = float(sps.t.ppf(0.5 + level / 2, df)) * se
    return Interval(math.exp(estimate), math.exp(estimate - half), math.exp(estimate + half),
                    int(min(la.size, lb.size)))
