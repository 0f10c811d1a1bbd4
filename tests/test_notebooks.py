"""The study notebooks: well-formed sources, and every one runs end to end with tiny parameters."""

import json
from pathlib import Path

import nbformat
import pytest

from multinorm.studies import NOTEBOOKS, SCALES, run_all

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_source_has_one_parameters_cell_and_no_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    # Scale overrides may only name parameters the notebook declares.
    declared = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line and not line.startswith(" ")}
    for scale in SCALES.values():
        assert set(scale[name]) <= declared, f"{name}: unknown parameters {set(scale[name]) - declared}"


def test_notebooks_hold_no_algorithm_code():
    for name in NOTEBOOKS:
        cells = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4).cells
        source = "\n".join(c.source for c in cells if c.cell_type == "code")
        for forbidden in ("torch.linalg.svd", "class ", "optimizer.step(", ".backward("):
            assert forbidden not in source, f"{name} contains {forbidden!r}"


# 04 reads 02's tuned runs, so they run together; the groups are independent and can run in parallel.
SMOKE_GROUPS = {"01": ["01_fixed_point"], "02+04": ["02_convergence", "04_ablations"], "03": ["03_memory_throughput"]}
STUDY = {"01_fixed_point": ("fixed_point", "01_fixed_point_residual"),
         "02_convergence": ("convergence", "02_convergence_curves"),
         "03_memory_throughput": ("memory", "03_memory_analytic"),
         "04_ablations": ("ablations", "04_ablations")}


def test_smoke_groups_cover_every_notebook():
    assert sorted(n for group in SMOKE_GROUPS.values() for n in group) == sorted(NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("group", SMOKE_GROUPS)
def test_smoke_run(group, tmp_path, data_cache_root):
    """`make smoke`: each notebook executes with tiny parameters and writes its CSVs, README table and figures.

    The notebook kernels inherit MULTINORM_DATA from `data_cache_root`, so they read the corpus built once per run."""
    names = SMOKE_GROUPS[group]
    run_all("smoke", tmp_path / "results", tmp_path / "figures", only=names)
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    for name in names:
        study, stem = STUDY[name]
        assert list((tmp_path / "results" / study).glob("*.csv")), study
        assert (tmp_path / "results" / study / f"readme_{study}.md").read_text().strip()
        assert {f"{stem}.png", f"{stem}.pdf"} <= figures
        executed = json.loads((tmp_path / "results" / "notebooks" / f"{name}.ipynb").read_text())
        errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
