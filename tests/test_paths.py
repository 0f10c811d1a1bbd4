"""Paths resolve from the repository root, not from the working directory."""

from pathlib import Path

from multinorm.data import default_cache_dir
from multinorm.paths import repo_root, resolve

REPO = Path(__file__).resolve().parents[1]


def test_repo_root_is_this_checkout_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repo_root() == REPO
    assert (repo_root() / "notebooks" / "01_fixed_point.ipynb").is_file()


def test_resolve_puts_relative_paths_under_the_root_and_keeps_absolute_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO / "notebooks")  # where Jupyter runs a notebook
    assert resolve("results") == REPO / "results"
    assert resolve(Path("results/reference/published_numbers.csv")).is_file()
    assert resolve(tmp_path / "out") == tmp_path / "out"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/out") == tmp_path / "out"


def test_data_cache_defaults_to_the_repository_and_yields_to_the_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MULTINORM_DATA", raising=False)
    assert default_cache_dir() == REPO / "data"
    monkeypatch.setenv("MULTINORM_DATA", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
