"""The study runner's bookkeeping: the timing table behind README's `make figures` duration, where results go, and the
recorded tables that reuse mode reads back."""

import json
import os

import pytest

from multinorm.studies.runner import _write_timing


def test_timing_table_merges_runs_per_scale_and_notebook(tmp_path):
    (tmp_path / "notebooks").mkdir()
    _write_timing(tmp_path, "quick", {"01_fixed_point": 61.04, "02_convergence": 119.96})
    _write_timing(tmp_path, "default", {"02_convergence": 3600.0})
    _write_timing(tmp_path, "quick", {"01_fixed_point": 90.0})  # replaces the first timing of 01 at quick
    csv = (tmp_path / "notebooks" / "timing.csv").read_text()
    assert csv == ("scale,notebook,seconds\n"
                   "default,02_convergence,3600.0\n"
                   "quick,01_fixed_point,90.0\n"
                   "quick,02_convergence,120.0\n")
    table = (tmp_path / "notebooks" / "readme_timing.md").read_text().split("\n\n")[1]
    assert table == ("| scale | notebook | minutes |\n|---|---|---|\n"
                     "| default | 02_convergence | 60.0 |\n"
                     "| default | **all** | **60.0** |\n"
                     "| quick | 01_fixed_point | 1.5 |\n"
                     "| quick | 02_convergence | 2.0 |\n"
                     "| quick | **all** | **3.5** |")


def test_run_folders_give_the_training_time_of_a_campaign_over_several_sittings(tmp_path, monkeypatch):
    import multinorm.studies.runner as studies

    monkeypatch.setattr(studies.os, "cpu_count", lambda: 2)
    runs = [("convergence", "a", "completed", 3600.0, 1), ("convergence", "b", "completed", 1800.0, 2),
            ("convergence", "c", "interrupted", 900.0, 1), ("ablations", "d", "completed", 7200.0, 1),
            ("playground", "e", "completed", 60.0, 1)]  # a playground run: not a study's
    for study, name, status, wall, threads in runs:
        folder = tmp_path / "runs" / study / name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"status": status, "wall_s": wall}))
        (folder / "config.json").write_text(json.dumps({"torch_threads": threads}))
    table = studies.run_time_table(tmp_path).set_index("study")
    assert table.loc["convergence", "runs"] == 2 and table.loc["convergence", "core_hours"] == pytest.approx(2.0)
    assert table.loc["ablations", "hours"] == pytest.approx(1.0) and "playground" not in table.index
    _write_timing(tmp_path, "default", {})  # a resumed sitting: no notebook timing, the runs' time all the same
    text = (tmp_path / "notebooks" / "readme_timing.md").read_text()
    assert "(none recorded yet)" in text and not (tmp_path / "notebooks" / "timing.csv").exists()
    assert "| convergence | 2 | 2.00 | 1.00 |" in text and "| **all** | **3** | **4.00** | **2.00** |" in text


def test_quick_scale_writes_to_its_own_folders_and_never_touches_readme(monkeypatch):
    import multinorm.studies.report
    import multinorm.studies.runner as studies

    calls = []
    monkeypatch.setattr(studies, "run_all", lambda *args: calls.append(args) or {"01_fixed_point": 1.0})
    monkeypatch.setattr(studies, "_write_timing", lambda *args: calls.append(("timing", *args)))
    monkeypatch.setattr(multinorm.studies.report, "update_readme", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the quick scale must not rewrite README")))
    assert studies.main(["figures", "--scale", "quick", "--resume", "--jobs", "2"]) == 0
    scale, results_dir, figures_dir, only, overrides, mode, jobs = calls[0]
    assert (scale, mode, jobs) == ("quick", "resume", 2)
    assert results_dir == studies.REPO / "results" / "quick"
    assert figures_dir == studies.REPO / "figures" / "quick"
    assert calls[1] == ("timing", results_dir, "quick", {})  # a resumed (partial) run: only the runs' own times


def test_default_scale_writes_results_and_readme(monkeypatch):
    import multinorm.studies.report
    import multinorm.studies.runner as studies

    calls = []
    monkeypatch.setattr(studies, "run_all", lambda *args: calls.append(args) or {"01_fixed_point": 1.0})
    monkeypatch.setattr(studies, "_write_timing", lambda *args: calls.append(("timing", *args)))
    monkeypatch.setattr(multinorm.studies.report, "update_readme", lambda readme, results: calls.append(("readme", results)) or [])
    assert studies.main(["figures", "--reuse"]) == 0
    assert calls[0][1] == studies.REPO / "results" and calls[0][5] == "reuse"
    assert calls[1] == ("timing", studies.REPO / "results", "default", {})  # reuse mode: no notebook timing
    assert calls[2] == ("readme", studies.REPO / "results")


def test_relative_results_and_figures_dirs_are_taken_from_the_current_directory(monkeypatch, tmp_path):
    import multinorm.studies.runner as studies

    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(studies, "run_all", lambda *args: calls.append(args) or {})
    assert studies.main(["figures", "--reuse", "--results-dir", "out", "--figures-dir", "figs"]) == 0
    assert calls[0][1:3] == (tmp_path / "out", tmp_path / "figs")


def test_reuse_tables_records_parameters_and_reuses_only_tables_made_with_them(tmp_path, capsys):
    from multinorm.studies.report import reuse_tables

    params = {"max_iters": 4, "extra_shapes": [(24, 16)]}
    assert reuse_tables(tmp_path, "reuse", params)  # tables recorded without parameters: read unchecked, with a note
    assert "without checking" in capsys.readouterr().out
    assert not reuse_tables(tmp_path, "train", params)
    assert json.loads((tmp_path / "parameters.json").read_text()) == {"max_iters": 4, "extra_shapes": [[24, 16]]}
    assert reuse_tables(tmp_path, "reuse", {"extra_shapes": [[24, 16]], "max_iters": 4})
    with pytest.raises(ValueError, match="max_iters: 4 there, 8 now"):
        reuse_tables(tmp_path, "reuse", {**params, "max_iters": 8})
    with pytest.raises(ValueError, match="seed"):
        reuse_tables(tmp_path, "reuse", {**params, "seed": 1})
    assert not reuse_tables(tmp_path, "resume", {**params, "max_iters": 8})  # computing again records the new ones
    assert json.loads((tmp_path / "parameters.json").read_text())["max_iters"] == 8


def test_notebook_kernels_report_finished_runs_to_the_terminal(tmp_path, monkeypatch):
    """The kernel of each notebook inherits `$MULTINORM_RUN_LOG`, so its grids print a line per finished run
    (`multinorm.studies.sweep`); the caller's environment is left as it was."""
    import papermill

    import multinorm.studies.runner as studies
    from multinorm.studies.sweep import RUN_LOG_ENV

    monkeypatch.delenv(RUN_LOG_ENV, raising=False)
    seen = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: seen.append(os.environ.get(RUN_LOG_ENV)))
    studies.run_notebook("02_convergence", {}, tmp_path)
    assert seen == ["1"] and RUN_LOG_ENV not in os.environ


def test_status_lists_finished_and_unfinished_runs(tmp_path, capsys):
    import multinorm.studies.runner as studies

    def run(name, summary, steps_logged):
        folder = tmp_path / "runs" / "convergence" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"steps": 768, "torch_threads": 1}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps_logged))
        if summary:
            (folder / "summary.json").write_text(json.dumps(summary))

    run("done", {"status": "completed", "wall_s": 3600.0}, [64, 768])
    run("stopped", {"status": "interrupted", "wall_s": 60.0}, [64, 128])
    run("starting", None, [])
    assert studies.main(["status", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == ["  convergence: 1 finished runs, 1.00 core-hours",
                       "  2 unfinished (make figures RESUME=1 continues them from their checkpoints):",
                       "    convergence/starting: last logged step 0 of 768",
                       "    convergence/stopped: last logged step 128 of 768"]


def test_jobs_default_to_one_run_per_core_on_the_cpu_and_one_on_a_gpu(monkeypatch):
    import multinorm.studies.runner as studies

    calls = []
    monkeypatch.setattr(studies, "run_all", lambda *args: calls.append(args) or {})
    monkeypatch.setattr(studies, "_write_timing", lambda *args: None)
    monkeypatch.setattr(studies.os, "cpu_count", lambda: 2)
    for argv, jobs in ((["--reuse", "--no-readme"], 2), (["--reuse", "--no-readme", "--set", "device=cuda"], 1),
                       (["--reuse", "--no-readme", "--jobs", "3"], 3)):
        assert studies.main(["figures", *argv]) == 0
        assert calls.pop()[6] == jobs, argv
    monkeypatch.setattr(studies.os, "cpu_count", lambda: 64)
    assert studies.default_jobs({}) == studies.MAX_DEFAULT_JOBS


def test_a_stopped_study_exits_130_with_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys):
    """A stop (Ctrl-C, a stop signal that ends the kernel, an interrupted cell) ends `figures` with a line
    saying how to continue and no timing or README update; any other error still raises."""
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    import multinorm.studies.runner as studies

    written = []
    monkeypatch.setattr(studies, "_write_timing", lambda *args: written.append(args))
    interrupted_cell = PapermillExecutionError(3, 1, "KeyboardInterrupt", "KeyboardInterrupt", "", [])
    for err in (KeyboardInterrupt(), DeadKernelError("Kernel died"), interrupted_cell):
        monkeypatch.setattr(studies, "run_all", lambda *args, err=err: (_ for _ in ()).throw(err))
        assert studies.main(["figures", "--resume", "--results-dir", str(tmp_path)]) == 130
        err_text = capsys.readouterr().err
        assert err_text.startswith("stopped: ") and "RESUME=1" in err_text and str(tmp_path / "runs") in err_text
    assert written == []
    failed_cell = PapermillExecutionError(3, 1, "ValueError", "bad", "", [])
    monkeypatch.setattr(studies, "run_all", lambda *args: (_ for _ in ()).throw(failed_cell))
    with pytest.raises(PapermillExecutionError):
        studies.main(["figures", "--results-dir", str(tmp_path)])
