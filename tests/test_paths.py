"""Paths resolve from the repository root, not from the working directory."""

import subprocess
import sys
from pathlib import Path

from multinorm.data import default_cache_dir
from multinorm.paths import child_env, repo_root, resolve

REPO = Path(__file__).resolve().parents[1]


def test_repo_root_is_this_checkout_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repo_root() == REPO
    assert (repo_root() / "notebooks" / "01_fixed_point.ipynb").is_file()


def test_resolve_puts_relative_paths_under_the_root_and_keeps_absolute_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO / "notebooks")  # where Jupyter runs a notebook
    assert resolve("results") == REPO / "results"
    assert resolve(Path("docs/reference/published_numbers.csv")).is_file()
    assert resolve(tmp_path / "out") == tmp_path / "out"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/out") == tmp_path / "out"


def test_data_cache_defaults_to_the_repository_and_yields_to_the_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MULTINORM_DATA", raising=False)
    assert default_cache_dir() == REPO / "data"
    monkeypatch.setenv("MULTINORM_DATA", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"


def test_a_child_process_imports_this_package_and_the_standard_library(tmp_path):
    """The environment the playground's runs and make e2e's kernel start with: this checkout's package first,
    and no module of the package in place of a standard one (multinorm/io.py once shadowed io and killed the
    kernel at start-up: Jupyter starts kernels with -X frozen_modules=off, so io is imported from sys.path)."""
    env = child_env({"PATH": "/usr/bin:/bin", "PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(":") == [str(REPO / "src"), "/elsewhere"]
    code = "import io, multinorm; io.open; print(multinorm.__file__)"
    out = subprocess.run([sys.executable, "-X", "frozen_modules=off", "-c", code], env=child_env(), cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == REPO / "src" / "multinorm" / "__init__.py"
