"""Study grids: finished runs are read back instead of trained again."""

import os

from multinorm.sweep import run_grid, train_or_reuse
from multinorm.train import TrainConfig


def micro(tmp_path, **overrides):
    settings = dict(model="nano", seq_len=32, batch_size=2, tokens=2 * 32 * 2, eval_interval=2, log_interval=1,
                    eval_tokens=32 * 8, eval_batch_size=8, lr=1e-3, results_dir=str(tmp_path / "runs"),
                    run_id="run", progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_reuse_returns_a_finished_run_without_training(tmp_path):
    cfg = micro(tmp_path)
    first = train_or_reuse(cfg)
    mtime = os.path.getmtime(first.run_dir / "metrics.jsonl")
    again = train_or_reuse(cfg, reuse=True)
    assert again.summary == first.summary
    assert os.path.getmtime(first.run_dir / "metrics.jsonl") == mtime
    # Without reuse the run is trained again, in the same folder.
    assert train_or_reuse(cfg).summary["final_val_loss"] == first.summary["final_val_loss"]
    assert os.path.getmtime(first.run_dir / "metrics.jsonl") != mtime


def test_reuse_ignores_bookkeeping_settings_but_not_the_rest(tmp_path):
    first = train_or_reuse(micro(tmp_path, hparams={"adam_betas": (0.9, 0.95)}))
    again = train_or_reuse(micro(tmp_path, hparams={"adam_betas": (0.9, 0.95)}, save_checkpoint=False,
                                 checkpoint_interval=1), reuse=True)
    assert again.summary == first.summary
    changed = train_or_reuse(micro(tmp_path, hparams={"adam_betas": (0.9, 0.95)}, lr=2e-3), reuse=True)
    assert changed.summary["run_id"] == "run" and changed.summary != first.summary


def test_an_interrupted_run_is_not_reused(tmp_path):
    cfg = micro(tmp_path, tokens=2 * 32 * 4)
    first = train_or_reuse(cfg)
    summary = first.run_dir / "summary.json"
    summary.write_text(summary.read_text().replace('"completed"', '"interrupted"'))
    again = train_or_reuse(cfg, reuse=True)
    assert again.status == "completed" and again.summary["steps_done"] == 4


def test_run_grid_table_has_one_row_per_run(tmp_path):
    base = micro(tmp_path, run_id=None)
    table = run_grid(base, [{"lr": 1e-3}, {"lr": 1e-3, "tag": "again"}, {"optimizer": "sgd", "lr": 1e12,
                                                                          "warmup_frac": 0.0}],
                     tmp_path / "grid", progress=False)
    assert list(table.run_id) == ["adamw-lr0.001-seed0", "again-lr0.001-seed0", "sgd-lr1e+12-seed0"]
    assert list(table.status) == ["completed", "completed", "diverged"]
    assert table.final_val_loss[0] == table.final_val_loss[1] and table.final_val_loss[2] == float("inf")
    # Study runs keep no checkpoint unless asked.
    assert not list((tmp_path / "grid").glob("*/checkpoint.pt"))
    reused = run_grid(base, [{"lr": 1e-3}], tmp_path / "grid", reuse=True, progress=False)
    assert reused.final_val_loss[0] == table.final_val_loss[0]
