"""Study grids: run identity by configuration, the train/resume/reuse modes, parallel workers, Ctrl-C."""

import io
import json
import signal
import sys

import pytest

from multinorm.studies.sweep import RUN_LOG_ENV, MissingRunsError, config_key, load_runs, run_grid, run_one
from multinorm.train import TrainConfig

VOLATILE = {"tokens_per_s", "wall_s", "peak_memory_bytes"}


def tiny(tmp_path, **overrides):
    settings = dict(model="nano", seq_len=32, batch_size=2, tokens=2 * 32 * 4, eval_interval=2, log_interval=1,
                    eval_tokens=32 * 8, eval_batch_size=8, lr=1e-3, results_dir=str(tmp_path / "runs"),
                    run_id="run", progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def test_config_key_follows_what_a_run_computes_not_how_it_is_kept(tmp_path):
    cfg = tiny(tmp_path)
    same = tiny(tmp_path, results_dir="elsewhere", run_id="x", save_checkpoint=False, checkpoint_interval=3,
                progress=True, cache_dir="/tmp/cache")
    assert config_key(cfg) == config_key(same)
    for change in ({"lr": 2e-3}, {"seed": 1}, {"hparams": {"adam_betas": (0.9, 0.95)}}, {"eval_tokens": 32 * 16}):
        assert config_key(tiny(tmp_path, **change)) != config_key(cfg), change


def test_modes_train_resume_and_reuse(tmp_path, monkeypatch):
    base = tiny(tmp_path, run_id=None)
    grid = [{"lr": 1e-3}, {"lr": 1e-3, "tag": "again"}, {"optimizer": "sgd", "lr": 1e12, "warmup_frac": 0.0}]
    table = run_grid(base, grid, tmp_path / "grid", progress=False)
    assert [r.rsplit("-", 1)[0] for r in table.run_id] == ["adamw-lr0.001-seed0", "again-lr0.001-seed0",
                                                          "sgd-lr1e+12-seed0"]
    assert list(table.status) == ["completed", "completed", "diverged"]
    assert table.final_val_loss[0] == table.final_val_loss[1] and table.final_val_loss[2] == float("inf")
    # Finished study runs keep no checkpoint.
    assert not list((tmp_path / "grid").glob("*/checkpoint.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "grid").glob("*/metrics.jsonl")}
    for mode in ("resume", "reuse"):
        again = run_grid(base, grid, tmp_path / "grid", mode=mode, progress=False)
        assert again.equals(table)
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "grid").glob("*/metrics.jsonl")}
    # A changed setting is another run: missing in reuse mode, trained in resume mode.
    with pytest.raises(MissingRunsError, match="1 run"):
        run_grid(base, [{"lr": 1e-3}, {"lr": 5e-4}], tmp_path / "grid", mode="reuse", progress=False)
    # Under `multinorm.studies` (the variable set) each finished run is also a line on the original stderr,
    # which a notebook kernel passes on to the terminal of `make figures`.
    monkeypatch.setenv(RUN_LOG_ENV, "1")
    monkeypatch.setattr(sys, "__stderr__", terminal := io.StringIO())
    more = run_grid(base, [{"lr": 1e-3}, {"lr": 5e-4}], tmp_path / "grid", mode="resume", progress=False)
    assert list(more.status) == ["completed", "completed"]
    plan, finished = terminal.getvalue().splitlines()
    assert plan.endswith("grid: 2 runs, 1 recorded, 1 to train")
    assert f"grid: 2/2 {more.run_id[1]} completed, val loss {more.final_val_loss[1]:.4f}; grid done" in finished
    assert set(load_runs(tmp_path / "grid").run_id) == set(table.run_id) | set(more.run_id)
    assert sorted(load_runs(tmp_path / "grid").tag) == ["", "", "", "again"]


def test_resume_continues_an_interrupted_run_from_its_checkpoint(tmp_path, monkeypatch, signal_at):
    base = tiny(tmp_path, run_id=None, tokens=2 * 32 * 8)
    reference = run_grid(base, [{"lr": 1e-3}], tmp_path / "ref", progress=False)
    signal_at(5)

    def exit_143(signum, frame):  # stands in for the default action, which would end the test process
        raise SystemExit(143)

    old = signal.signal(signal.SIGTERM, exit_143)
    try:
        with pytest.raises(SystemExit):  # the signal is re-raised once the run has saved its state
            run_grid(base, [{"lr": 1e-3}], tmp_path / "grid", progress=False)
    finally:
        signal.signal(signal.SIGTERM, old)
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "grid").glob("*/")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert (run_dir / "checkpoint.pt").exists()
    resumed = run_grid(base, [{"lr": 1e-3}], tmp_path / "grid", mode="resume", progress=False)
    assert resumed.final_val_loss[0] == reference.final_val_loss[0]
    assert metrics(run_dir) == metrics(tmp_path / "ref" / reference.run_id[0])


def test_a_worker_keeps_a_stop_signal_and_starts_no_further_run(tmp_path, monkeypatch, signal_at):
    """What a pool worker does (a `_start_worker` latch, then ``_execute(..., worker=True)`` per run): a signal in
    a run's last step lets that run complete but is kept, and so is one between runs; the runs the pool had
    already handed the worker then come back as None without a folder, so the grid stops promptly."""
    import multinorm.studies.sweep as sweep
    from multinorm.train import train

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sweep, "_latch", None)
    base = tiny(tmp_path)  # 4 steps
    try:
        sweep._start_worker()
        signal_at(3)  # the batch of the last step
        last = sweep._execute(TrainConfig(**{**base.__dict__, "run_id": "last"}), "train", worker=True)
        assert last.status == "completed" and last.signal == "SIGTERM"
        assert sweep._execute(TrainConfig(**{**base.__dict__, "run_id": "next"}), "train", worker=True) is None
        assert not (tmp_path / "runs" / "next").exists()

        sweep._start_worker()
        signal.raise_signal(signal.SIGTERM)  # between two runs
        assert sweep._execute(TrainConfig(**{**base.__dict__, "run_id": "next"}), "train", worker=True) is None
        # a run started while the latch holds a signal stops after its first step, and can be resumed
        held = train(TrainConfig(**{**base.__dict__, "run_id": "held", "save_checkpoint": True}))
        assert held.status == "interrupted" and held.summary["steps_done"] == 1 and held.signal == "SIGTERM"
        assert (held.run_dir / "checkpoint.pt").exists()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_a_signal_in_the_last_step_of_a_run_stops_the_grid_after_it(tmp_path, signal_at):
    """Nothing is left to stop in a run's last step: the run completes, and the grid starts no further run."""
    signal_at(3, signal.SIGINT)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_grid(tiny(tmp_path, run_id=None), [{"lr": 1e-3}, {"lr": 2e-3}], tmp_path / "grid", progress=False)
    finally:
        signal.signal(signal.SIGINT, old)
    (done,) = (tmp_path / "grid").glob("*/summary.json")
    assert json.loads(done.read_text())["status"] == "completed" and "lr0.001" in done.parent.name


def test_ctrl_c_stops_the_whole_grid_after_saving_the_current_run(tmp_path, signal_at):
    """SIGINT during the second run: that run ends "interrupted" on disk, then KeyboardInterrupt reaches
    the caller as it would without the trainer's handler, and no later run starts."""
    loads = signal_at(0, signal.SIGINT, nth_load=2)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        base = tiny(tmp_path, run_id=None)
        with pytest.raises(KeyboardInterrupt):
            run_grid(base, [{"lr": 1e-3}, {"lr": 2e-3}, {"lr": 3e-3}], tmp_path / "grid", progress=False)
    finally:
        signal.signal(signal.SIGINT, old)
    assert len(loads) == 2
    (cut,) = (tmp_path / "grid").glob("adamw-lr0.002-seed0-*/summary.json")
    assert '"interrupted"' in cut.read_text()
    assert not list((tmp_path / "grid").glob("adamw-lr0.003-seed0-*"))


def test_parallel_workers_give_the_same_runs(tmp_path):
    base = tiny(tmp_path, run_id=None)
    grid = [{"lr": 2e-3, "seed": 1}, {"optimizer": "sinkgd", "lr": 1e-3, "hparams": {"adam_lr": 1e-3}}]
    serial = run_grid(base, grid, tmp_path / "serial", progress=False)
    parallel = run_grid(base, grid, tmp_path / "parallel", jobs=2, progress=False)
    assert list(parallel.run_id) == list(serial.run_id)
    assert list(parallel.final_val_loss) == list(serial.final_val_loss)
    for rid in serial.run_id:
        assert metrics(tmp_path / "parallel" / rid) == metrics(tmp_path / "serial" / rid)


def test_run_one_reuse_mode_needs_a_finished_run(tmp_path):
    cfg = tiny(tmp_path)
    with pytest.raises(MissingRunsError):
        run_one(cfg, "reuse")
    first = run_one(cfg, "train")
    assert run_one(cfg, "reuse").summary == first.summary
    with pytest.raises(ValueError, match="mode"):
        run_one(cfg, "bogus")
