"""Study grids: finished runs are read back instead of trained again, and a Ctrl-C stops the whole grid."""

import os
import signal

import pytest

import multinorm.train as train_module
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


def test_ctrl_c_stops_the_whole_grid_after_saving_the_current_run(tmp_path, monkeypatch):
    """SIGINT during the second run: that run ends "interrupted" on disk, then KeyboardInterrupt reaches
    the caller as it would without the trainer's handler, and no later run starts."""
    real_load = train_module.load_data
    loads = []

    def load_data(*args, **kwargs):
        data = real_load(*args, **kwargs)
        loads.append(data)
        if len(loads) == 2:
            real_batch = data.train_batch

            def train_batch(i, batch_size):
                if i == 0:
                    signal.raise_signal(signal.SIGINT)
                return real_batch(i, batch_size)

            data.train_batch = train_batch
        return data

    monkeypatch.setattr(train_module, "load_data", load_data)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        base = micro(tmp_path, run_id=None)
        with pytest.raises(KeyboardInterrupt):
            run_grid(base, [{"lr": 1e-3}, {"lr": 2e-3}, {"lr": 3e-3}], tmp_path / "grid", progress=False)
    finally:
        signal.signal(signal.SIGINT, old)
    assert len(loads) == 2
    cut = (tmp_path / "grid" / "adamw-lr0.002-seed0" / "summary.json").read_text()
    assert '"interrupted"' in cut
    assert not (tmp_path / "grid" / "adamw-lr0.003-seed0").exists()


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
