"""The study runner's bookkeeping: the timing table behind README's `make figures` duration."""

from multinorm.studies import _write_timing


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
    table = (tmp_path / "notebooks" / "readme_timing.md").read_text().split("\n\n", 1)[1]
    assert table == ("| scale | notebook | minutes |\n|---|---|---|\n"
                     "| default | 02_convergence | 60.0 |\n"
                     "| default | **all** | **60.0** |\n"
                     "| quick | 01_fixed_point | 1.5 |\n"
                     "| quick | 02_convergence | 2.0 |\n"
                     "| quick | **all** | **3.5** |\n")


def test_quick_scale_writes_to_its_own_folders_and_never_touches_readme(monkeypatch):
    import multinorm.report
    import multinorm.studies as studies

    calls = []
    monkeypatch.setattr(studies, "run_all", lambda *args: calls.append(args) or {"01_fixed_point": 1.0})
    monkeypatch.setattr(studies, "_write_timing", lambda *args: calls.append(("timing", *args)))
    monkeypatch.setattr(multinorm.report, "update_readme", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the quick scale must not rewrite README")))
    assert studies.main(["figures", "--scale", "quick", "--resume", "--jobs", "2"]) == 0
    scale, results_dir, figures_dir, only, overrides, mode, jobs = calls[0]
    assert (scale, mode, jobs) == ("quick", "resume", 2)
    assert results_dir == studies.REPO / "results" / "quick"
    assert figures_dir == studies.REPO / "figures" / "quick"
    assert len(calls) == 1  # a resumed (partial) run records no timing


def test_default_scale_writes_results_and_readme(monkeypatch):
    import multinorm.report
    import multinorm.studies as studies

    calls = []
    monkeypatch.setattr(studies, "run_all", lambda *args: calls.append(args) or {"01_fixed_point": 1.0})
    monkeypatch.setattr(studies, "_write_timing", lambda *args: calls.append(("timing", *args)))
    monkeypatch.setattr(multinorm.report, "update_readme", lambda readme, results: calls.append(("readme", results)) or [])
    assert studies.main(["figures", "--reuse"]) == 0
    assert calls[0][1] == studies.REPO / "results" and calls[0][5] == "reuse"
    assert calls[1] == ("readme", studies.REPO / "results")  # reuse mode records no timing
