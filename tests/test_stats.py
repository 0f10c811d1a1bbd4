"""Paired intervals, speed-ups and verdicts (multinorm.studies.stats)."""

import math

import numpy as np
import pytest

from multinorm.studies.stats import mean_ci, product_ci, ratio_ci, token_speedup, tokens_to_reach, verdict


def test_mean_ci_matches_the_t_interval_by_hand():
    x = [0.1, -0.05, 0.2, 0.07, 0.12]
    ci = mean_ci(x)
    n, mean, sd = len(x), np.mean(x), np.std(x, ddof=1)
    half = 2.7764451051977987 * sd / math.sqrt(n)  # t_{0.975, 4}
    assert ci.estimate == pytest.approx(mean)
    assert (ci.low, ci.high) == pytest.approx((mean - half, mean + half))
    assert ci.n == 5


def test_mean_ci_edge_cases():
    assert mean_ci([0.3]).low == -math.inf and mean_ci([0.3]).high == math.inf
    same = mean_ci([0.2, 0.2, 0.2])
    assert (same.low, same.high) == (0.2, 0.2)
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([0.1, math.inf])
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


def test_ratio_ci_is_the_geometric_mean_with_a_log_scale_interval():
    ci = ratio_ci([2.0, 0.5, 1.0])
    assert ci.estimate == pytest.approx(1.0)
    assert ci.low < 1.0 < ci.high
    assert ci.low * ci.high == pytest.approx(1.0)  # symmetric on the log scale
    with pytest.raises(ValueError, match="positive"):
        ratio_ci([1.0, -2.0])


def test_tokens_to_reach_interpolates_the_first_crossing():
    tokens, losses = [0, 100, 200, 300], [8.0, 6.0, 5.0, 4.0]
    assert tokens_to_reach(tokens, losses, 5.5) == pytest.approx(150.0)
    assert tokens_to_reach(tokens, losses, 9.0) == 0.0
    assert math.isnan(tokens_to_reach(tokens, losses, 3.0))


def test_token_speedup_against_a_curve_twice_as_fast():
    base_t = np.linspace(0, 1000, 11)
    base_y = 8.0 - 3.0 * np.sqrt(base_t / 1000)          # reaches 5.0 at the budget
    fast_y = 8.0 - 3.0 * np.sqrt(np.minimum(2 * base_t, 1000) / 1000)
    s, censored = token_speedup(base_t, base_y, base_t, fast_y, fraction=1.0)
    assert not censored and s == pytest.approx(2.0, rel=0.02)
    s50, _ = token_speedup(base_t, base_y, base_t, fast_y, fraction=0.5)
    assert s50 == pytest.approx(2.0, rel=0.05)


def test_token_speedup_of_a_curve_that_never_gets_there_is_censored_at_an_upper_bound():
    t = [0, 500, 1000]
    s, censored = token_speedup(t, [8, 6, 5], t, [8, 7, 6.5], fraction=1.0)
    assert censored and s == pytest.approx(1.0)  # below T_base / budget = 1
    s, censored = token_speedup(t, [8, 6, 5], t, [8, 7, 6.5], fraction=0.5)
    assert censored and s == pytest.approx(0.5)


@pytest.mark.parametrize("low,high,expected", [
    (0.5, 0.9, "contradicted"),
    (0.8, 1.3, "not reproduced"),
    (0.9, 2.5, "not reproduced"),
    (1.2, 1.6, "partly"),
    (1.5, 2.2, "reproduced"),
    (2.5, 3.0, "reproduced"),
])
def test_verdicts(low, high, expected):
    assert verdict(low, high, claim=2.0) == expected


def test_a_claim_above_what_the_setting_can_show_is_not_testable():
    # whatever the interval: a ceiling below the claim decides
    assert verdict(1.005, 1.02, claim=1.09, ceiling=1.014) == "not testable here"
    assert verdict(0.5, 0.9, claim=1.09, ceiling=1.014) == "not testable here"
    # a ceiling at or above the claim leaves the interval to decide
    assert verdict(1.005, 1.02, claim=1.09, ceiling=1.5) == "partly"
    assert verdict(0.99, 1.02, claim=1.09, ceiling=1.09) == "not reproduced"


def test_verdict_rejects_a_claim_of_no_effect():
    with pytest.raises(ValueError):
        verdict(1.1, 1.2, claim=1.0)


def test_token_speedup_is_finite_when_a_curve_starts_at_the_target():
    t = [0, 100, 200]
    # the baseline never improves: its target is the shared starting loss, reached by both at 0 tokens
    assert token_speedup(t, [8, 8.5, 9], t, [8, 7, 6], fraction=1.0) == (1.0, False)
    # a curve that starts below the target (no shared start): bounded by its first evaluation after 0
    assert token_speedup(t, [8, 7, 6], [0, 50, 200], [5.5, 5.2, 5], fraction=1.0) == (200 / 50, False)


def test_product_ci_multiplies_geometric_means_and_widens_with_either_spread():
    a, b = [2.0, 2.2, 1.8, 2.1], [1.1, 1.1, 1.1]
    ci = product_ci(a, b)
    assert ci.estimate == pytest.approx(float(np.exp(np.log(a).mean())) * 1.1)
    # b without spread: the interval is a's own (t with n_a - 1 degrees of freedom) times 1.1
    a_only = ratio_ci(a)
    assert (ci.low, ci.high) == pytest.approx((a_only.low * 1.1, a_only.high * 1.1))
    wider = product_ci(a, [1.0, 1.2, 1.1])
    assert wider.high / wider.low > ci.high / ci.low
    with pytest.raises(ValueError):
        product_ci([2.0], b)
