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
