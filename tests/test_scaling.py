"""The scaling study's pieces: cells at the base cell's steps, centred grids, per-seed speed-ups and trends."""

import math

import numpy as np
import pandas as pd
import pytest

from multinorm.studies.scaling import (RECIPE_CLAIM, Cell, CellResult, cell_config, centred_grid,
                                       explanation_verdict, gap_trend, runs_dir_of, seed_loss_gaps, seed_speedups,
                                       trend, with_explanations)
from multinorm.train import TrainConfig


def test_a_cell_keeps_the_base_steps_and_evaluation_steps():
    base = TrainConfig(model="nano", batch_size=8, seq_len=256, tokens=1_572_864, eval_interval=64)
    assert cell_config(base, Cell("nano", 8)) == base  # the base cell is the base study's regime (same run keys)
    big = cell_config(base, Cell("nano", 64))
    assert (big.steps, big.tokens_per_step, big.tokens, big.eval_interval) == (768, 16_384, 12_582_912, 64)
    wide = cell_config(base, Cell("micro", 8))
    assert (wide.model, wide.steps, wide.tokens) == ("micro", 768, 1_572_864)
    with pytest.raises(ValueError, match="batch size"):
        cell_config(base, Cell("nano", 0))


def test_base_cell_runs_are_the_convergence_study_s(tmp_path):
    base = Cell("nano", 8)
    assert runs_dir_of(base, base, tmp_path) == tmp_path / "runs" / "convergence"
    assert runs_dir_of(Cell("nano", 16), base, tmp_path) == tmp_path / "runs" / "scaling"


def test_centred_grid():
    assert centred_grid(0.002) == (0.001, 0.002, 0.004)
    assert centred_grid(0.02, points=4) == (0.01, 0.02, 0.04, 0.08)
    assert centred_grid(1.0, points=1) == (1.0,)
    with pytest.raises(ValueError):
        centred_grid(0.0)


def test_trend_recovers_a_known_slope_and_names_its_side():
    x = np.repeat([2048, 4096, 16384], 3)
    noise = np.tile([-0.01, 0.0, 0.01], 3)
    rising = np.exp(np.log(1.2) * np.log2(x / 2048) + noise)  # x1.2 per doubling
    t = trend(x, rising, claim=2.4)
    assert t["slope"] == pytest.approx(1.2) and t["slope_low"] < 1.2 < t["slope_high"]
    assert t["trend"] == "toward the claim" and t["n"] == 9
    # the same rise moves away from a claim that lies below the speed-ups (a claimed slow-down)
    assert trend(x, rising, claim=1.05)["trend"] == "away"
    assert trend(x, 1 / rising, claim=2.4)["trend"] == "away"
    assert trend(x, np.exp(noise / 10), claim=2.4)["trend"] == "flat"
    assert trend(x, rising, claim=None)["trend"] == "rising"
    # wide scatter: the interval straddles 1 and leaves the +-5 % band
    scatter = np.exp(np.tile([-0.5, 0.0, 0.5], 3) + 0.01 * np.log2(x / 2048))
    assert trend(x, scatter, claim=2.4)["trend"] == "undecided"
    # a single cell has no slope
    assert math.isnan(trend([2048] * 3, [1.1, 1.2, 1.3], claim=2.0)["slope"])


def test_gap_trend_reads_the_final_loss_gap_per_doubling():
    x = np.repeat([2048, 4096, 16384], 3)
    noise = np.tile([-0.002, 0.0, 0.002], 3)
    widening = 0.07 + 0.04 * np.log2(x / 2048) + noise  # the method falls behind by 0.04 nats per doubling
    t = gap_trend(x, widening)
    assert t["gap_slope"] == pytest.approx(0.04) and t["gap_low"] < 0.04 < t["gap_high"] and t["n"] == 9
    assert t["trend"] == "away"
    assert gap_trend(x, 0.2 - 0.04 * np.log2(x / 2048) + noise)["trend"] == "toward the claim"
    assert gap_trend(x, 0.1 + noise)["trend"] == "flat"  # within +-0.01 nats per doubling
    scatter = 0.1 + np.tile([-0.2, 0.0, 0.2], 3)
    assert gap_trend(x, scatter)["trend"] == "undecided"
    assert math.isnan(gap_trend([2048] * 3, [0.1, 0.2, 0.3])["gap_slope"])  # one cell: no slope
    assert gap_trend([2048, 4096, 4096, 8192], [0.1, np.nan, 0.2, 0.3])["n"] == 3  # a diverged seed is left out


def test_seed_loss_gaps_pair_by_seed():
    final = pd.DataFrame([{"method": m, "seed": s, "run_id": f"{m}-{s}", "final_val_loss": loss}
                          for m, s, loss in (("adamw", 0, 3.8), ("adamw", 1, 3.9), ("adamw", 2, 3.7),
                                             ("sinkgd", 1, 4.0), ("sinkgd", 0, 3.85))])
    result = CellResult(Cell("nano", 8), TrainConfig(), pd.DataFrame(), final, pd.DataFrame(), {})
    gaps = seed_loss_gaps(result, "sinkgd", "adamw")
    assert gaps.seed.tolist() == [0, 1] and gaps.gap.tolist() == pytest.approx([0.05, 0.1])


def test_seed_speedups_pair_by_seed_and_mark_bounds():
    tokens = np.linspace(0, 1000, 11)
    final, curves = [], []
    for seed in (0, 1):
        for method, speed in (("adamw", 1.0), ("fast", 2.0), ("slow", 0.5)):
            loss = 8 - 3 * np.sqrt(min(speed, 1.5) * tokens / 1000) - 0.01 * seed
            if method == "slow":
                loss = loss + 0.5  # never reaches AdamW's final loss
            rid = f"{method}-{seed}"
            final.append({"method": method, "seed": seed, "run_id": rid, "final_val_loss": loss[-1]})
            curves += [{"run_id": rid, "tokens": t, "val_loss": y} for t, y in zip(tokens, loss)]
    result = CellResult(Cell("nano", 8), TrainConfig(), pd.DataFrame(), pd.DataFrame(final), pd.DataFrame(curves), {})
    fast = seed_speedups(result, "fast", "adamw")
    assert fast.seed.tolist() == [0, 1] and not fast.censored.any()
    assert fast.speedup.tolist() == pytest.approx([1.5, 1.5], rel=0.02)
    slow = seed_speedups(result, "slow", "adamw")
    assert slow.censored.all() and (slow.speedup <= 1.0).all()


def test_campaign_time_text_counts_the_campaigns_own_runs_against_its_budget():
    from multinorm.studies.scaling import campaign_time_text

    times = pd.DataFrame({"study": ["convergence", "scaling", "scaling_probe"], "runs": [86, 40, 4],
                          "core_hours": [13.9, 20.0, 1.0], "hours": [6.95, 10.0, 0.5]})
    partial = campaign_time_text(times, complete=False)
    assert partial.startswith("The scaling campaign has taken 21.0 core-hours over 44 runs")
    assert "10.5 hours of a 2-core machine so far, of the 12 it was planned for;" in partial
    done = campaign_time_text(times.assign(core_hours=[13.9, 29.0, 1.0]), complete=True)
    assert "30.0 core-hours over 44 runs" in done and "3.0 hours over the 12 it was planned for." in done
    assert "at most 10.5 hours of a 2-core machine" in partial and "bounds the machine's time from above" in partial
    assert "at most 3.0 hours over the 12" in done
    assert "already at most 3.0 over" in campaign_time_text(times.assign(core_hours=[13.9, 29.0, 1.0]), complete=False)
    assert "within the 12 it was planned for" in campaign_time_text(times, complete=True)


def _explanations(estimate, low, high, censored, cell="nano-2048", method="sinkgd-paper"):
    return pd.DataFrame([{"method": method, "reference": "adamw", "quantity": q, "estimate": e, "ci_low": lo,
                          "ci_high": hi, "n": 3, "censored": c, "cell": cell}
                         for q, e, lo, hi, c in (("final_loss_diff", -0.02, -0.03, -0.01, 0),
                                                 ("speedup_100", estimate, low, high, censored))])


@pytest.mark.parametrize("estimate,low,high,censored,word", [
    (1.08, 1.03, 1.13, 0, "partly"),           # faster than AdamW, well short of 2.4x
    (1.05, 0.97, 1.14, 0, "not reproduced"),   # not resolved from 1
    (2.6, 2.2, 3.0, 0, "reproduced"),          # the claim inside the interval
    (1.0, 1.0, 1.0, 3, "contradicted"),        # no seed reached AdamW's loss
])
def test_the_recipe_answers_sinkgds_token_claim_from_its_speedup_row(estimate, low, high, censored, word):
    row = explanation_verdict(_explanations(estimate, low, high, censored), "nano-2048")
    assert row["verdict"] == word and row["claim"] == RECIPE_CLAIM[0] and row["reference"] == "adamw"
    assert (row["ours"], row["ci_low"], row["ci_high"], row["n"], row["censored"]) == (estimate, low, high, 3,
                                                                                         censored)


def test_the_recipe_verdict_is_absent_until_its_cell_is_recorded():
    assert explanation_verdict(_explanations(1.08, 1.03, 1.13, 0, cell="nano-16384"), "nano-2048") is None
    assert explanation_verdict(_explanations(1.08, 1.03, 1.13, 0, method="sinkgd-momentum"), "nano-2048") is None


def test_with_explanations_pairs_an_explanation_with_the_cells_methods():
    final = pd.DataFrame([{"method": m, "seed": s, "run_id": f"{m}-{s}", "final_val_loss": loss}
                          for m, s, loss in (("adamw", 0, 3.8), ("adamw", 1, 3.9))])
    extra = pd.DataFrame([{"method": "sinkgd-paper", "seed": s, "run_id": f"p-{s}", "final_val_loss": loss}
                          for s, loss in ((0, 3.7), (1, 3.95))])
    result = CellResult(Cell("nano", 8), TrainConfig(), pd.DataFrame(), final, pd.DataFrame(), {})
    explained = CellResult(Cell("nano", 8), TrainConfig(), pd.DataFrame(), extra, pd.DataFrame(), {})
    assert with_explanations(result, None) is result
    gaps = seed_loss_gaps(with_explanations(result, explained), "sinkgd-paper", "adamw")
    assert gaps.gap.tolist() == pytest.approx([-0.1, 0.05])
    assert len(result.final) == 2  # the cell's own table is left as it was
