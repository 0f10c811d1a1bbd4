"""The committed results: every table is one that code in this repository writes."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _code_text() -> str:
    files = [p for folder in ("src", "notebooks") for p in (REPO / folder).rglob("*")
             if p.suffix in (".py", ".ipynb") and p.is_file()]
    return "\n".join(p.read_text() for p in [*files, REPO / "Makefile"])


def test_every_committed_result_table_is_named_by_code():
    """A CSV, README snippet or parameter record under results/ (outside the run folders, whose names are
    configuration keys) must be named by the code that writes it: a table no code names is a leftover that
    no `make figures` or `make bench` would reproduce."""
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    tables = [Path(t) for t in tracked if Path(t).suffix in (".csv", ".md", ".json")
              and not t.startswith("results/runs/")]
    assert tables, "no result tables found"
    code = _code_text()
    orphans = [str(t) for t in tables if t.name not in code]
    assert not orphans, f"result files no code writes: {orphans}"
