"""multinorm.studies.fixed_point: notebook 01's summary sentences from its tables."""

import pandas as pd

from multinorm.studies.fixed_point import shape_kind, summary_lines

EPS = 1.19e-07
THRESHOLDS = {"1e-3": 1e-3, "fp32": EPS}


def tables():
    synthetic = pd.DataFrame(
        [{"method": "SinkGD", "shape": s, "shape_kind": k, "matrix": "gaussian", "L": L, "residual": r}
         for s, k, rs in (("4×8", "wide", (1e-2, 1e-4, 1e-8)), ("8×4", "tall", (2e-2, 3e-4, 2e-8)))
         for L, r in zip((1, 2, 3), rs)]
        + [{"method": "SWAN", "shape": s, "shape_kind": k, "matrix": "gaussian", "L": L, "residual": r}
           for s, k, rs in (("4×8", "wide", (1e-9, 1e-9)), ("8×4", "tall", (0.3, 0.2))) for L, r in zip((1, 2), rs)])
    real = pd.DataFrame(
        [{"when": w, "method": "SinkGD", "param": "p", "layer_type": "q_proj", "shape": "4×8", "L": L, "residual": r}
         for w in ("init", "trained") for L, r in zip((1, 2, 3), (1e-2, 1e-4, 1e-8))]
        + [{"when": "init", "method": "SWAN", "param": "p", "layer_type": "down_proj", "shape": "4×8", "L": 1,
            "residual": 2e-9}])
    needed = pd.DataFrame([
        {"method": "SinkGD", "source": "synthetic", "group": "wide, gaussian", "L for 1e-3": 2, "L for fp32": 3},
        {"method": "SinkGD", "source": "LLaMA gradient", "group": "q_proj (init)", "L for 1e-3": 2, "L for fp32": 3},
        {"method": "SinkGD", "source": "LLaMA gradient", "group": "q_proj (trained)", "L for 1e-3": 2,
         "L for fp32": "> 3"},
    ])
    monotone = pd.DataFrame({"non-decreasing from k=2": [True, True, False]})
    return synthetic, real, needed, monotone


def test_shape_kind():
    assert [shape_kind(2, 2), shape_kind(3, 2), shape_kind(2, 3)] == ["square", "tall", "wide"]


def test_summary_lines_state_what_the_tables_show():
    lines = summary_lines(*tables(), THRESHOLDS, max_iters=3, default_iters=2, capture_tokens=4096, fp32_eps=EPS)
    assert len(lines) == 4
    assert lines[0] == ("* **SR-Sinkhorn converges to a fixed point.** Worst residual over 2 shapes × 2 matrix kinds: "
                        "2.0e-02 after L = 1, 3.0e-04 after L = 2, 2.0e-08 after L = 3.")
    assert "needs more passes on real LLaMA gradients than on synthetic matrices" in lines[1]
    assert "after training (4,096 AdamW tokens) 2 (1e-3), > 3 (fp32)" in lines[1]
    assert "default L = 2 is enough for 1e-3 on every layer, not for fp32" in lines[1]
    assert "on 2 of 3 matrix/method cases, up to float64 round-off (a tolerance of 1e-12" in lines[2]
    assert "is a one-pass fixed point on wide matrices** (`down_proj`: worst residual 1.0e-09" in lines[3]
    assert "real LLaMA gradients 2.0e-09 after one pass" in lines[3]
    assert "but not on tall ones (`gate_proj`, `up_proj`: residual 3.0e-01 after one pass" in lines[3]
    assert "This is what `docs/algorithms.md#when-one-pass-is-a-fixed-point` predicts." in lines[3]


def test_a_result_against_the_prediction_is_said_so():
    synthetic, real, needed, monotone = tables()
    synthetic.loc[(synthetic.method == "SWAN") & (synthetic.shape_kind == "tall"), "residual"] = 1e-10
    line = summary_lines(synthetic, real, needed, monotone, THRESHOLDS, max_iters=3, default_iters=5,
                         capture_tokens=1, fp32_eps=EPS)[3]
    assert "one-pass fixed point on wide matrices and tall ones" in line
    assert "the tall matrices do not follow that prediction" in line
    assert "default L = 5 is beyond the 3 passes computed here" in summary_lines(
        synthetic, real, needed, monotone, THRESHOLDS, max_iters=3, default_iters=5, capture_tokens=1,
        fp32_eps=EPS)[1]
