"""The repository root, and paths relative to it rather than to the working directory.

A notebook opened in Jupyter runs in `notebooks/`, `make figures` runs it from the repository root: the notebooks
pass their path parameters (`results_dir = "results"`, ...) through `resolve`, so both write to the same places.
The data cache default (`data/`) is resolved the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["repo_root", "resolve", "child_env"]

_PACKAGE = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The checkout this package is imported from (the folder with `pyproject.toml` above `src/multinorm/`, as in
    the editable install `make setup` makes); the current directory for a package installed outside a checkout."""
    root = _PACKAGE.parents[1]
    return root if (root / "pyproject.toml").is_file() and root / "src" / "multinorm" == _PACKAGE else Path.cwd()


def resolve(path: str | os.PathLike) -> Path:
    """`path` if it is absolute (after `~` expansion), else `path` under the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path


def child_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) with the folder that holds this package first on ``PYTHONPATH``, so that
    a Python process started with it (a training subprocess, a notebook kernel) imports this same package. (Not
    the package folder itself: its modules would shadow the standard library's, e.g. ``multinorm/io.py``.)"""
    environ = dict(os.environ if environ is None else environ)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE.parent), environ.get("PYTHONPATH")]))
    return environ
