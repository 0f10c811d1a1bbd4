"""Notebook 04's answers: each question's sentence follows the paired intervals, and SWAN's claim gets its word."""

import pandas as pd
import pytest

from multinorm.ablations import QUESTIONS, VARIANTS, ablation_answers, effect
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
