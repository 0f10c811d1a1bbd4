"""Notebook 04's answers: each question's sentence follows the paired intervals, and SWAN's claim gets its word."""

import pandas as pd
import pytest

import math

from multinorm.studies.ablations import QUESTIONS, VARIANTS, ablation_answers, effect, lr_sensitivity
from multinorm.optim import OPTIMIZERS


def _diff(**rows):
    return pd.DataFrame([{"method": m, "estimate": e, "ci_low": lo, "ci_high": hi, "n": 3}
                         for m, (e, lo, hi) in rows.items()])


def test_every_variant_uses_a_registered_optimizer_and_answers_one_question():
    assert all(v.optimizer in OPTIMIZERS and v.parent in ("sinkgd", "swan") and v.change for v in VARIANTS.values())
    asked = [name for names in QUESTIONS.values() for name in names]
    assert sorted(asked) == sorted(VARIANTS)


@pytest.mark.parametrize("interval,word", [((0.1, 0.05, 0.15), "worse than"), ((-0.1, -0.15, -0.05), "better than"),
                                           ((0.01, -0.02, 0.04), "not distinguishable from"),
                                           ((0.0, 0.0, 0.0), "not distinguishable from")])
def test_effect_reads_the_interval_of_variant_minus_parent(interval, word):
    row = _diff(x=interval).iloc[0]
    assert effect(row) == word


@pytest.mark.parametrize("gradnorm_only,whiten_only,verdict", [
    ((0.3, 0.2, 0.4), (0.05, 0.01, 0.09), "**reproduced**"),
    ((0.3, 0.2, 0.4), (0.01, -0.02, 0.04), "**partly** (removing whitening"),
    ((0.01, -0.02, 0.04), (0.05, 0.01, 0.09), "**partly** (removing GradNorm"),
    ((0.01, -0.02, 0.04), (-0.05, -0.09, -0.01), "**not reproduced**"),
])
def test_swans_claim_that_both_parts_are_needed(gradnorm_only, whiten_only, verdict):
    text = ablation_answers(_diff(**{"swan-gradnorm-only": gradnorm_only, "swan-whiten-only": whiten_only}))
    assert f"both parts are needed: {verdict}" in text


def test_answers_name_each_variant_once_and_the_grid_edges():
    diff = _diff(**{"sinkgd-L1": (0.02, 0.01, 0.03), "sinkgd-L10": (0.0, -0.01, 0.01),
                    "rows-only": (-0.03, -0.05, -0.01), "cols-only": (float("nan"),) * 3})
    grids = pd.DataFrame({"method": ["sinkgd-L1", "sinkgd-L10", "rows-only"], "interior": [True, False, True]})
    text = ablation_answers(diff, grids)
    assert "sinkgd-L1 (one SR-Sinkhorn pass instead of 5) is worse than sinkgd (+0.020 nats [+0.010, +0.030], 3 seeds)" in text
    assert "sinkgd-L10 (ten SR-Sinkhorn passes instead of 5) is not distinguishable from sinkgd" in text
    assert "rows-only (rows normalized only) is better than sinkgd" in text
    assert "No paired comparison (a seed diverged or is missing): cols-only." in text
    assert "grid edge after the allowed extensions: sinkgd-L10." in text
    assert "SWAN's parts" not in text
    assert "interior to its grid" in ablation_answers(diff, grids.assign(interior=True))


def test_lr_sensitivity_compares_every_method_on_the_same_window():
    # "wide" was swept over 1/16..2x its optimum, "narrow" over 1/2..2x: a range over the grid would call "wide"
    # the more sensitive (its far points), but within x2 of the tuned lr "narrow" rises more.
    rows = [("wide", lr, 0.999, loss) for lr, loss in
            [(1 / 16, 6.0), (1 / 8, 5.0), (1 / 4, 4.5), (0.5, 4.05), (1.0, 4.0), (2.0, 4.1)]]
    rows += [("narrow", lr, 0.999, loss) for lr, loss in [(0.5, 4.4), (1.0, 4.0), (2.0, 4.2)]]
    rows += [("narrow", 1.0, 0.95, 3.0)]  # the other beta2 does not count
    rows += [("edge", lr, 0.999, loss) for lr, loss in [(1.0, 4.0), (2.0, 4.3)]]
    rows += [("diverges", lr, 0.999, loss) for lr, loss in [(0.5, 4.2), (1.0, 4.0), (2.0, math.inf)]]
    sweep = pd.DataFrame(rows, columns=["method", "lr", "beta2", "final_val_loss"]).assign(seed=0)
    tuned = pd.DataFrame({"lr": 1.0, "beta2": 0.999}, index=["wide", "narrow", "edge", "diverges"])
    table = lr_sensitivity(sweep, tuned).set_index("method")
    assert table.rise["wide"] == pytest.approx(0.1) and table.rise["narrow"] == pytest.approx(0.4)
    assert math.isnan(table.rise["edge"]) and table.rise["diverges"] == math.inf
    assert table.loc["narrow", ["loss_low", "loss_tuned", "loss_high"]].tolist() == [4.4, 4.0, 4.2]
