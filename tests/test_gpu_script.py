"""`make gpu` (python -m multinorm.bench.gpu): its CPU dry run writes every part's table, naming the device."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from multinorm.bench.gpu import GPU_PLAN, main


@pytest.mark.slow
def test_the_dry_run_writes_every_part_with_the_device_named(tmp_path):
    subprocess.run([sys.executable, "-m", "multinorm.bench.gpu", "--dry-run", "--out", str(tmp_path)], check=True,
                   timeout=600, capture_output=True)
    assert json.loads((tmp_path / "environment.json").read_text())["device_name"] == "cpu"
    steps = pd.read_csv(tmp_path / "optimizer_step.csv")
    assert {"adamw-foreach", "adamw-fused", "sinkgd", "swan", "muon"} <= set(steps.method)
    assert (steps.device_name == "cpu").all()
    timed = steps.set_index("method").step_ms
    assert timed[["adamw-foreach", "adamw-fused", "sinkgd"]].notna().all()
    skipped = steps.note.fillna("").astype(str).str.startswith("skipped")
    assert (steps.step_ms.notna() | skipped).all()  # a slow one is skipped, saying so
    assert set(pd.read_csv(tmp_path / "memory_bandwidth.csv").stream) >= {"copy"}
    training = pd.read_csv(tmp_path / "training.csv")
    assert list(training.optimizer) == ["adamw", "sinkgd", "swan", "galore"]
    assert (training.tokens_per_s > 0).all() and training.note.isna().all()
    parallel = pd.read_csv(tmp_path / "parallel.csv")
    assert list(parallel["mode"]) == ["ddp", "fsdp"] and (parallel.status == "passed").all()


def test_the_gpu_plan_covers_the_issue_s_settings_in_both_precisions():
    assert GPU_PLAN.step_settings == ("block-1b", "hidden-350m", "hidden-1b")
    assert set(GPU_PLAN.step_dtypes) == {torch.bfloat16, torch.float32}
    assert [m for m, _ in GPU_PLAN.train_models] == ["350m", "1b"] and GPU_PLAN.seq_len == 256


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no CUDA device") and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_a_part_past_its_time_budget_says_what_it_left_out(tmp_path):
    import dataclasses

    from multinorm.bench.gpu import DRY_PLAN, part_training

    plan = dataclasses.replace(DRY_PLAN, budget_s={"training": 0.0})  # spent before the first run
    part_training(plan, torch.device("cpu"), tmp_path, lambda msg: None)
    table = pd.read_csv(tmp_path / "training.csv")
    assert list(table.optimizer) == ["adamw", "sinkgd", "swan", "galore"]
    assert table.note.str.startswith("not measured: the part's 0 s were spent").all()
    assert table.tokens_per_s.isna().all()
