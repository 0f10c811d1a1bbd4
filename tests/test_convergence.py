"""The convergence study's protocol: grid extension, seeds, paired comparisons and verdicts."""

import math

import numpy as np
import pandas as pd
import pytest

from multinorm.studies.convergence import (ConvergenceStudy, StudyMethod, _extension, bench_throughput,
                                   bench_throughput_ratios, best_config, interior, paired_comparisons,
                                   results_table, seed_curves, selection_bias, verdict_lines, verdict_table,
                                   comparison_table, speedup_groups, speedup_text)
from multinorm.train import TrainConfig


def sweep_table(points):
    return pd.DataFrame([{"method": "m", "lr": lr, "beta2": b2, "final_val_loss": loss} for lr, b2, loss in points])


def test_grid_extension_moves_towards_the_better_edge():
    assert _extension(sweep_table([(1, 0.95, 5.0), (2, 0.95, 4.0), (4, 0.95, 4.5)])) is None
    assert _extension(sweep_table([(1, 0.95, 5.0), (2, 0.95, 4.8), (4, 0.95, 4.5)])) == 8
    assert _extension(sweep_table([(1, 0.95, 4.0), (2, 0.95, 4.8), (4, 0.95, math.inf)])) == 0.5
    # the edge is judged at the best beta2 only
    assert _extension(sweep_table([(1, 0.95, 4.0), (2, 0.95, 4.8), (1, 0.999, 5.0), (2, 0.999, 4.9),
                                   (0.5, 0.999, 5.5)])) == 0.5
    assert _extension(sweep_table([(0.0, 0.95, 4.0)])) is None


class FakeStudy(ConvergenceStudy):
    """The protocol with a known loss surface instead of training: loss = (log2 lr - log2 optimum)^2 per beta2
    (beta2 = 0.95 0.1 nats worse at its optimum)."""

    OPTIMUM = {0.95: 16.0, 0.999: 2.0}

    def _run(self, rows):
        self.asked = getattr(self, "asked", []) + [(r["lr"], r["hparams"]["adam_betas"][1]) for r in rows]
        return pd.DataFrame([{"method": r["tag"], "lr": r["lr"], "seed": r["seed"], "run_id": f"{r['lr']}-{b2}",
                              "beta2": b2, "final_val_loss": 3 + (b2 == 0.95) / 10 + (math.log2(r["lr"]) - math.log2(self.OPTIMUM[b2])) ** 2}
                             for r in rows for b2 in [r["hparams"]["adam_betas"][1]]])


def test_each_beta2_is_extended_until_its_own_optimum_is_interior():
    study = FakeStudy(TrainConfig(), "unused", max_extensions=3, progress=False)
    adamw = StudyMethod("adamw", "adamw", (1.0, 2.0, 4.0), rest_adamw=False, tune_beta2=True)
    sweep = study.tune_adamw(adamw)
    # beta2 = 0.999 wins at 2 (interior); beta2 = 0.95, best on the top edge, is extended to 8, 16, 32
    assert study.adamw == {"lr": 2.0, "beta2": 0.999}
    assert sorted(lr for lr, b2 in study.asked if b2 == 0.95) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert sorted(lr for lr, b2 in study.asked if b2 == 0.999) == [1.0, 2.0, 4.0]
    assert interior(sweep).iloc[0][["interior", "edges"]].tolist() == [True, ""]
    # with the extensions spent before 0.95 reaches its optimum, the table says which beta2 is on an edge
    short = FakeStudy(TrainConfig(), "unused", max_extensions=1, progress=False)
    assert interior(short.tune_adamw(adamw)).iloc[0][["interior", "edges"]].tolist() == [False, "0.95"]


def test_selection_bias_counts_identical_methods_once_and_names_the_method_that_drives_it():
    losses = {"a": [3.0, 3.2, 3.4], "a-copy": [3.0, 3.2, 3.4], "b": [4.1, 4.0, 4.2], "outlier": [5.0, 6.0, 6.0]}
    final = pd.DataFrame([{"method": m, "seed": s, "final_val_loss": v} for m, vs in losses.items()
                          for s, v in enumerate(vs)])
    bias = selection_bias(final).set_index("method")
    # seed 0 minus the mean of seeds 1 and 2, per method: a -0.3, b 0.0, outlier -1.0; a-copy is a's runs
    assert "a-copy" not in bias.index
    assert bias.loc[["a", "b", "outlier"], "estimate"].tolist() == pytest.approx([-0.3, 0.0, -1.0])
    assert bias.loc["all methods", "estimate"] == pytest.approx(-1.3 / 3) and bias.loc["all methods", "n"] == 3
    assert bias.loc["all methods but outlier", "estimate"] == pytest.approx(-0.15)
    assert bias.loc["all methods but outlier", "n"] == 2


def synthetic(method_speed, seeds=(1, 2, 3, 4, 5)):
    """Final table and curves where `method` follows the baseline's curve `method_speed` times faster."""
    tokens = np.linspace(0, 1000, 21)
    final, curves = [], []
    for seed in seeds:
        noise = 0.01 * seed
        for method, speed in (("base", 1.0), ("fast", method_speed)):
            loss = 8 - 3 * np.sqrt(speed * tokens / 1000) + noise
            rid = f"{method}-{seed}"
            final.append({"method": method, "seed": seed, "run_id": rid, "final_val_loss": loss[-1],
                          "tokens_per_s": 1000.0 * (1.1 if method == "fast" else 1.0)})
            curves += [{"run_id": rid, "tokens": t, "val_loss": y} for t, y in zip(tokens, loss)]
    return pd.DataFrame(final), pd.DataFrame(curves)


def test_paired_comparisons_recover_a_known_speed_up():
    final, curves = synthetic(2.0)
    table = paired_comparisons(final, curves, "base").set_index("quantity")
    for f in ("speedup_50", "speedup_75", "speedup_100"):
        assert table.loc[f, "estimate"] == pytest.approx(2.0, rel=0.03)
        assert table.loc[f, "n"] == 5 and table.loc[f, "censored"] == 0
    assert table.loc["throughput_ratio", "estimate"] == pytest.approx(1.1)
    assert table.loc["final_loss_diff", "ci_high"] < 0  # the fast method ends lower on every seed


def test_a_slower_method_is_contradicted_and_censored_seeds_are_counted():
    final, curves = synthetic(0.5)
    table = paired_comparisons(final, curves, "base").set_index("quantity")
    # never reaching the baseline's final loss: censored at the bound T_base / budget = 1
    assert table.loc["speedup_100", "censored"] == 5 and table.loc["speedup_100", "ci_high"] == pytest.approx(1.0)
    assert table.loc["speedup_50", "estimate"] == pytest.approx(0.5, rel=0.05)
    rename = {r: r.replace("fast", "swan") for r in curves.run_id.unique()}
    final = final.replace({"fast": "swan", **rename})
    curves = curves.replace(rename)
    verdicts = verdict_table(final, curves, baseline="base").set_index("claim")
    assert verdicts.iloc[0].verdict == "contradicted"



def test_throughput_claims_use_the_benchmark_when_given():
    final, curves = synthetic(2.0)
    rename = {r: r.replace("fast", "sinkgd") for r in curves.run_id.unique()}
    final, curves = final.replace({"fast": "sinkgd", **rename}), curves.replace(rename)
    # interleaved rounds: AdamW 1.0 s per step, SinkGD about 0.8 s -> about 1.25x the tokens/s
    sink = (0.80, 0.82, 0.79, 0.81)
    raw = pd.DataFrame([{"table": "train_throughput", "round": r, "name": n, "seconds": t}
                        for r in range(4) for n, t in (("adamw", 1.0), ("sinkgd", sink[r]))])
    ratios = bench_throughput_ratios(raw, "sinkgd")
    assert ratios == pytest.approx([1 / t for t in sink])
    with pytest.raises(ValueError, match="no 'swan'"):
        bench_throughput_ratios(raw, "swan")
    runs_only = verdict_table(final, curves, "base").set_index("claim")
    bench = verdict_table(final, curves, "base", throughput={"sinkgd": ratios}).set_index("claim")
    raw_claim = "SinkGD's raw throughput is 1.09x Adam's"
    eff_claim = "SinkGD's effective throughput is 3x Adam's"
    assert runs_only.loc[raw_claim, "ours"] == pytest.approx(1.1) and runs_only.loc[raw_claim, "source"] == "study runs"
    assert bench.loc[raw_claim, "ours"] == pytest.approx(1.25, rel=0.02) and bench.loc[raw_claim, "source"] == "make bench"
    assert bench.loc[raw_claim, "verdict"] == "reproduced"  # above 1.09 in every round
    assert bench.loc[eff_claim, "ours"] == pytest.approx(2.0 * 1.25, rel=0.04)
    assert bench.loc[eff_claim, "ci_low"] < bench.loc[eff_claim, "ours"] < bench.loc[eff_claim, "ci_high"]


def test_bench_throughput_is_read_only_for_the_same_regime(tmp_path):
    base = TrainConfig(model="nano", vocab_size=1024, batch_size=8, seq_len=256)
    assert bench_throughput(tmp_path, base) == {}  # no benchmark at all
    raw = pd.DataFrame([{"table": "train_throughput", "round": r, "name": n, "seconds": t}
                        for r in range(3) for n, t in (("adamw", 1.0), ("sinkgd", 0.5), ("swan", 2.0))])
    raw.to_csv(tmp_path / "raw_times.csv", index=False)
    rows = [{"model": "nano", "device": "cpu", "vocab_size": 1024, "batch_size": 8, "seq_len": 256, "optimizer": m}
            for m in ("adamw", "sinkgd", "swan")]
    pd.DataFrame(rows).to_csv(tmp_path / "train_throughput.csv", index=False)
    found = bench_throughput(tmp_path, base)
    assert set(found) == {"sinkgd", "swan"}
    assert found["sinkgd"] == pytest.approx([2.0] * 3) and found["swan"] == pytest.approx([0.5] * 3)
    assert bench_throughput(tmp_path, TrainConfig(model="nano", vocab_size=1024, batch_size=16, seq_len=256)) == {}
    pd.DataFrame(rows).drop(columns="vocab_size").to_csv(tmp_path / "train_throughput.csv", index=False)
    assert bench_throughput(tmp_path, base) == {}  # a benchmark that did not record its vocabulary


def test_results_table_and_verdict_lines_carry_the_intervals():
    final, curves = synthetic(2.0)
    final = final.assign(lr=np.where(final.method == "base", 2e-3, 5e-4))
    comparisons = paired_comparisons(final, curves, "base")
    table = results_table(final, comparisons, ["base", "fast"], "base").set_index("method")
    assert table.loc["base", "Δ loss vs baseline"] == "(baseline)" and table.loc["base", "seeds"] == 5
    assert table.loc["fast", "lr"] == 5e-4
    speed = comparisons.set_index(["method", "quantity"]).loc[("fast", "speedup_100")]
    assert table.loc["fast", "speed-up @100%"] == f"{speed.estimate:.2f} [{speed.ci_low:.2f}, {speed.ci_high:.2f}]"
    assert table.loc["fast", "Δ loss vs baseline"].startswith("-")

    verdicts = pd.DataFrame([{"claim": "X is 2x faster", "paper": "2x", "ours": 1.5, "ci_low": 1.2, "ci_high": 1.9,
                              "verdict": "partly", "reference": "base"}])
    grids = pd.DataFrame({"method": ["base", "fast"], "interior": [True, False]})
    regime = pd.DataFrame([{"quantity": "bigram", "value": 4.1, "met": ""},
                           {"quantity": "R1: bigram - baseline", "value": 0.31, "met": True},
                           {"quantity": "R2: frozen hidden - baseline", "value": 0.2, "met": False}])
    bias = pd.Series({"estimate": -0.01, "ci_low": -0.03, "ci_high": 0.01})
    lines = verdict_lines(verdicts, grids, regime, bias)
    assert lines[0] == "* X is 2x faster (paper: 2x): ours **1.50×** [1.20, 1.90] vs base → **partly**."
    assert "edge of its grid" in lines[1] and "fast" in lines[1]
    assert "not distinguishable from 0" in lines[2]
    assert lines[3] == "* Regime checks: R1: bigram - baseline = 0.31 (met); R2: frozen hidden - baseline = 0.2 (NOT met)."
    assert len(verdict_lines(verdicts, grids.assign(interior=True), regime)) == 3

    # censored seeds (the target never reached within the budget): the value is a bound, and reads as one
    censored = verdicts.assign(ours=1.0, ci_low=1.0, ci_high=1.0, n=5, censored=5, verdict="contradicted")
    assert verdict_lines(censored, grids, regime)[0] == (
        "* X is 2x faster (paper: 2x): ours **< 1.00×** (5/5 seeds never reached base's loss within the budget) "
        "→ **contradicted**.")
    some = verdicts.assign(n=5, censored=2, source="study runs")
    assert comparison_table(some)["ours [95 % CI]"].iloc[0] == "≤ 1.50 [1.20, 1.90] (2/5 not reached)"
    assert speedup_text(1.5, 1.2, 1.9, 5, 0) == "1.50 [1.20, 1.90]"


def test_speedup_groups_read_bounds_as_bounds():
    rows = [("fast", 1.2, 1.1, 1.3, 5, 0), ("slow", 0.8, 0.7, 0.9, 5, 0), ("never", 1.0, 1.0, 1.0, 3, 3),
            ("tie", 1.0, 0.9, 1.1, 5, 0), ("bound", 1.2, 1.1, 1.3, 5, 2)]
    comparisons = pd.DataFrame([{"method": m, "quantity": "speedup_100", "estimate": e, "ci_low": lo, "ci_high": hi,
                                 "n": n, "censored": c} for m, e, lo, hi, n, c in rows])
    assert speedup_groups(comparisons) == {"faster": ["fast"], "slower": ["slow"], "never reached": ["never"],
                                           "undecided": ["tie", "bound"]}


@pytest.mark.slow
def test_a_tiny_study_end_to_end(tmp_path):
    base = TrainConfig(model="nano", seq_len=32, batch_size=2, tokens=2 * 32 * 4, eval_interval=2, log_interval=2,
                       eval_tokens=32 * 8, eval_batch_size=8, vocab_size=4096)
    study = ConvergenceStudy(base, tmp_path / "runs", max_extensions=1, progress=False)
    adamw = StudyMethod("adamw", "adamw", (1e-3, 2e-3), seeds=2, rest_adamw=False, tune_beta2=True)
    others = [StudyMethod("adamw-split", "adamw", (1e-3,), seeds=2, tune_beta2=True),
              StudyMethod("frozen-hidden", "adamw", (0.0,), seeds=2),
              StudyMethod("sinkgd", "sinkgd", (1e-3, 2e-3), seeds=2)]
    sweep = pd.concat([study.tune_adamw(adamw), study.tune(others)], ignore_index=True)
    assert study.adamw["beta2"] in (0.95, 0.999)
    assert set(sweep[sweep.method == "adamw"].beta2) == {0.95, 0.999}
    # the mixed methods' AdamW part runs at the tuned AdamW lr and beta2
    sink = sweep[sweep.method == "sinkgd"].hparams.iloc[0]
    assert f'"adam_lr": {study.adamw["lr"]}' in sink and f'{study.adamw["beta2"]}' in sink
    assert set(interior(sweep).method) == {"adamw", "adamw-split", "frozen-hidden", "sinkgd"}
    fresh = study.seeds([adamw, *others], sweep, reuse_selection_seed=False)
    assert [sorted(v) for v in fresh.groupby("method").seed.apply(list)] == [[1, 2]] * 4
    final = study.seeds([adamw, *others], sweep)  # the sweep's winner is seed 0; seed 1 is reused from above
    assert [sorted(v) for v in final.groupby("method").seed.apply(list)] == [[0, 1]] * 4
    winners = sweep[sweep.seed == 0].merge(final[final.seed == 0], on="run_id")
    assert len(winners) == 4 and (winners.final_val_loss_x == winners.final_val_loss_y).all()
    bias = selection_bias(final).set_index("method")
    by_seed = final.pivot(index="seed", columns="method", values="final_val_loss")
    distinct = 4 - int((by_seed["adamw"] == by_seed["adamw-split"]).all())  # identical forms count once
    assert bias.loc["all methods", "n"] == distinct and len(bias) == distinct + 2
    seed0, seed1 = (final[final.seed == s].set_index("method").final_val_loss for s in (0, 1))
    assert bias.loc["sinkgd", "estimate"] == pytest.approx(seed0["sinkgd"] - seed1["sinkgd"])
    best = best_config(sweep).set_index("method")
    assert (final.groupby("method").lr.first() == best.lr.loc[final.groupby("method").lr.first().index]).all()
    curves = seed_curves(final, tmp_path / "runs")
    table = paired_comparisons(final, curves, "adamw")
    assert set(table.method) == {"adamw-split", "frozen-hidden", "sinkgd"}
    assert (table.n == 2).all()
