"""The playground (notebook 00): settings, the overlay, the headless notebook, the widgets' Train and Stop."""

import json
import math
import os
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from multinorm.studies.playground import (REPO, LossPlot, Playground, Settings, reference_curve, reference_train_curve,
                                  repo_path, run_figure, tuned_run)
from multinorm.studies.runner import NOTEBOOKS

NOTEBOOK = REPO / "notebooks" / "00_playground.ipynb"


def tiny(**overrides):
    """A run of a few seconds: sequences of 32 tokens, batch 2, a 256-token validation set."""
    settings = dict(optimizer="sinkgd", lr=1e-3, adam_lr=1e-3, steps=4, batch_size=2, seq_len=32, eval_interval=2,
                    eval_tokens=32 * 8, eval_batch_size=8)
    settings.update(overrides)
    return Settings(**settings)


def write_study(tmp_path, start_loss=7.0):
    """A convergence study's two tables, as 02_convergence writes them, with SinkGD only."""
    curves = tmp_path / "curves.csv"
    pd.DataFrame({"method": ["sinkgd"] * 3, "tokens": [0, 1_000, 2_000], "mean": [start_loss, 6.5, 6.2],
                  "ci_low": [start_loss - 0.01, 6.4, 6.1], "ci_high": [start_loss + 0.01, 6.6, 6.3]}).to_csv(curves)
    final = tmp_path / "final_runs.csv"
    hparams = [json.dumps({"adam_lr": 0.004, "adam_betas": [0.9, 0.95]}), json.dumps({"adam_lr": 0.004})]
    pd.DataFrame({"method": ["sinkgd", "sinkgd"], "seed": [0, 1], "lr": [5e-4, 5e-4], "hparams": hparams}).to_csv(final)
    return curves, final


def test_each_optimizer_gets_only_the_options_it_takes():
    assert tiny(optimizer="sinkgd", iters=3).hparams() == {"adam_lr": 1e-3, "iters": 3}
    assert tiny(optimizer="swan", whiten=False).hparams() == {"adam_lr": 1e-3, "gradnorm": True, "whiten": False}
    assert tiny(optimizer="sgd").hparams() == {}
    # the study's other hyper-parameters ride along, the widgets' values win
    assert tiny(optimizer="mngd", extra_hparams={"iters": 9, "adam_betas": [0.9, 0.95]}).hparams() == \
        {"adam_lr": 1e-3, "iters": 5, "adam_betas": [0.9, 0.95]}


def test_runs_land_under_the_repository_root_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny().config()
    assert Path(cfg.results_dir) == REPO / "results" / "runs" / "playground"
    assert repo_path(tmp_path) == tmp_path
    assert cfg.steps == 4 and cfg.tokens_per_step == 64
    assert tiny(seed=1).config().run_id != cfg.run_id and tiny().config().run_id == cfg.run_id


def test_tuned_settings_come_from_the_studys_seed_0_run(tmp_path):
    _, final = write_study(tmp_path)
    assert tuned_run("sinkgd", final) == (5e-4, {"adam_lr": 0.004, "adam_betas": [0.9, 0.95]})
    assert tuned_run("swan", final) is None and tuned_run("sinkgd", tmp_path / "missing.csv") is None
    settings = tiny(iters=2).tuned(final)
    assert (settings.lr, settings.adam_lr, settings.iters) == (5e-4, 0.004, 2)
    assert settings.hparams() == {"adam_lr": 0.004, "iters": 2, "adam_betas": [0.9, 0.95]}


def test_choosing_an_optimizer_loads_its_tuned_settings_and_shows_its_options(tmp_path):
    _, final = write_study(tmp_path)
    pg = Playground(tiny(optimizer="swan"), runs_dir=tmp_path / "runs", final_runs_csv=final)
    assert pg.iters.layout.display == "none" and pg.gradnorm.layout.display is None
    pg.optimizer.value = "sinkgd"
    assert (pg.lr.value, pg.adam_lr.value) == (5e-4, 0.004) and "adam_betas" in pg.status.value
    assert pg.iters.layout.display is None and pg.gradnorm.layout.display == "none"
    assert pg.settings().config(tmp_path).hparams["adam_betas"] == [0.9, 0.95]
    pg.optimizer.value = "sgd"  # no tuned run in this study: the lrs stay, the study's extras go
    assert pg.lr.value == 5e-4 and "no tuned run" in pg.status.value and pg.adam_lr.layout.display == "none"
    assert pg.settings().hparams() == {}


def test_the_overlay_is_the_studys_curve_or_a_reason_why_not(tmp_path):
    curves, _ = write_study(tmp_path)
    curve, note = reference_curve("sinkgd", curves)
    assert list(curve.tokens) == [0, 1_000, 2_000] and "tuned SinkGD" in note
    assert reference_curve("swan", curves)[0] is None and "no SWAN" in reference_curve("swan", curves)[1]
    missing = reference_curve("sinkgd", tmp_path / "none.csv")
    assert missing[0] is None and "missing" in missing[1]


def test_the_overlay_adds_the_tuned_runs_mean_training_loss(tmp_path):
    (tmp_path / "convergence").mkdir()
    final = tmp_path / "convergence" / "final_runs.csv"
    pd.DataFrame({"method": ["sinkgd", "sinkgd", "swan"], "seed": [0, 1, 0], "run_id": ["a", "b", "c"]}).to_csv(final)
    for run, losses in (("a", [7.0, 6.0]), ("b", [6.0, 5.0])):
        folder = tmp_path / "runs" / "convergence" / run
        folder.mkdir(parents=True)
        rows = [{"step": 0, "tokens": 0, "train_loss": None, "val_loss": 7.5}] + [
            {"step": i + 1, "tokens": 100 * (i + 1), "train_loss": x, "val_loss": None} for i, x in enumerate(losses)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = reference_train_curve("sinkgd", final)
    assert train.tokens.tolist() == [100, 200] and train["mean"].tolist() == [6.5, 5.5]
    assert reference_train_curve("swan", final) is None  # its record is not there
    assert reference_train_curve("sinkgd", write_study(tmp_path)[1]) is None  # a table without run ids


def test_the_plot_follows_the_rows_and_flags_a_study_of_another_setting(tmp_path):
    curves, _ = write_study(tmp_path, start_loss=7.0)
    rows = [{"step": 0, "tokens": 0, "train_loss": None, "val_loss": 7.02},
            {"step": 1, "tokens": 64, "train_loss": 7.0, "val_loss": None},
            {"step": 2, "tokens": 128, "train_loss": 6.9, "val_loss": 6.95}]
    plot = LossPlot(tiny().config(tmp_path), curves_csv=curves)
    plot.update(rows[:1])
    plot.update(rows)
    assert list(plot.train_line.get_xdata()) == [64, 128] and list(plot.val_line.get_ydata()) == [7.02, 6.95]
    assert plot.comparable and plot.updates == 2 and plot.png().startswith(b"\x89PNG")
    (tmp_path / "other").mkdir()
    other = LossPlot(tiny().config(tmp_path), curves_csv=write_study(tmp_path / "other", start_loss=8.3)[0])
    other.update(rows)
    assert not other.comparable and "not comparable" in other.note


def test_the_playground_is_not_a_study_notebook_and_is_committed_clean():
    assert "00_playground" not in NOTEBOOKS
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert len([c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]) == 1
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for forbidden in ("class ", "def ", "optimizer.step(", ".backward(", "threading", "subprocess"):
        assert forbidden not in source


def finished_record(run_dir, status):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == status, (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "config.json").read_text())["config"]["optimizer"]
    return summary


@pytest.mark.slow
def test_headless_notebook_trains_one_run_and_saves_its_figures(tmp_path, data_cache_root, monkeypatch):
    import papermill

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    parameters = {**{k: v for k, v in vars(tiny()).items() if k not in ("extra_hparams", "lr", "adam_lr")},
                  "interactive": False, "run_sweep": True, "sweep_lr_multipliers": [0.5, 2.0],
                  "runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "figures")}
    papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "executed.ipynb"), parameters=parameters,
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "sweep"]
    assert finished_record(run_dir, "completed")["steps_done"] == 4
    assert len(list((tmp_path / "runs" / "sweep").glob("*/summary.json"))) == 2
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {
        f"00_playground_{name}.{ext}" for name in ("run", "sweep") for ext in ("png", "pdf")}
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    images = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_train_button_runs_in_the_background_with_a_live_plot(tmp_path, data_cache_root):
    pg = Playground(tiny(), runs_dir=tmp_path / "runs", poll_s=0.1)
    pg.optimizer.value = "swan"
    assert pg.iters.layout.display == "none" and pg.whiten.layout.display is None
    pg.lr.value, pg.adam_lr.value, pg.whiten.value, pg.steps.value, pg.seed.value = 2e-3, 1e-3, False, 6, 3
    pg.train_button.click()
    assert pg.train_button.disabled and not pg.stop_button.disabled  # click returned while the run goes on
    assert pg.run.running()
    summary = pg.wait(timeout=150)
    assert summary["status"] == "completed" and summary["steps_done"] == 6
    config = json.loads((pg.run.run_dir / "config.json").read_text())["config"]
    assert (config["optimizer"], config["lr"], config["seed"]) == ("swan", 2e-3, 3)
    assert config["hparams"]["whiten"] is False and config["hparams"]["adam_lr"] == 1e-3
    rows = [json.loads(line) for line in (pg.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(pg.plot.train_line.get_ydata()) == 6 and len(pg.plot.val_line.get_ydata()) == 4  # steps 0, 2, 4, 6
    assert list(pg.plot.val_line.get_ydata()) == [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert pg.plot.updates >= 2  # drawn as the run went, not only at its end
    assert "image/png" in pg.output.outputs[0]["data"]
    assert "completed" in pg.status.value and not pg.train_button.disabled and pg.stop_button.disabled
    assert math.isclose(run_figure(pg.run.run_dir).axes[0].lines[-1].get_ydata()[-1], summary["final_val_loss"])


@pytest.mark.slow
def test_stop_button_ends_the_run_cleanly_after_its_current_step(tmp_path, data_cache_root):
    pg = Playground(tiny(steps=400, eval_interval=1000), runs_dir=tmp_path / "runs", poll_s=0.1)
    pg.train_button.click()
    wait_for(lambda: any(r["step"] >= 1 for r in pg.run.rows()))
    pg.stop_button.click()
    summary = pg.wait(timeout=60)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
    assert 1 <= summary["steps_done"] < 400
    assert pg.run.process.returncode == 130
    finished_record(pg.run.run_dir, "interrupted")
    assert "interrupted" in pg.status.value and not pg.train_button.disabled
