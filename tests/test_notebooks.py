"""The study notebooks: well-formed sources, and every one runs end to end with tiny parameters."""

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from multinorm.studies.runner import NOTEBOOKS, SCALES, run_all

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_source_has_one_parameters_cell_and_no_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    ids = [json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())["cells"][i].get("id") for i in range(len(nb.cells))]
    assert all(ids) and len(set(ids)) == len(ids)  # nbformat 4.5: every cell has its own id
    # Scale overrides may only name parameters the notebook declares.
    declared = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line and not line.startswith(" ")}
    for scale in SCALES.values():
        assert set(scale[name]) <= declared, f"{name}: unknown parameters {set(scale[name]) - declared}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_path_parameters_are_resolved_from_the_repository_first(name):
    """Jupyter runs a notebook in `notebooks/`: every path parameter goes through `multinorm.paths.resolve` in the
    cell after the parameters, before anything reads or writes."""
    cells = [c for c in nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4).cells if c.cell_type == "code"]
    first = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    declared = {line.split("=")[0].strip() for line in cells[first].source.splitlines() if "=" in line}
    paths = sorted(p for p in declared if p.endswith(("_dir", "_csv")))
    assert {"results_dir", "figures_dir"} <= set(paths)
    assert all(f"resolve({p})" in cells[first + 1].source for p in paths), paths


def test_notebooks_hold_no_algorithm_code():
    for name in NOTEBOOKS:
        cells = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4).cells
        source = "\n".join(c.source for c in cells if c.cell_type == "code")
        for forbidden in ("torch.linalg.svd", "class ", "optimizer.step(", ".backward("):
            assert forbidden not in source, f"{name} contains {forbidden!r}"


# 04 reads 02's tuned runs and 05 its verdicts, so they run together; the groups are independent and can run in
# parallel.
SMOKE_GROUPS = {"01": ["01_fixed_point"], "02+04+05": ["02_convergence", "04_ablations", "05_scaling"],
                "03": ["03_memory_throughput"]}
# Notebooks run again in reuse mode, per group. 01 and 03 reuse recorded tables through `report.reuse_tables`
# (tested in test_studies.py) and 04 reads its runs back the way 02 does (`sweep` in reuse mode); a second kernel
# for each would add a minute to `make test`, so 02 and 05 (whose cells read their runs back through the scaling
# study) are re-run here.
REUSE = {"02+04+05": ["02_convergence", "05_scaling"]}
STUDY = {"01_fixed_point": ("fixed_point", "01_fixed_point_residual"),
         "02_convergence": ("convergence", "02_convergence_curves"),
         "03_memory_throughput": ("memory", "03_memory_analytic"),
         "04_ablations": ("ablations", "04_ablations"),
         "05_scaling": ("scaling", "05_scaling_speedups")}


def test_smoke_groups_cover_every_notebook():
    assert sorted(n for group in SMOKE_GROUPS.values() for n in group) == sorted(NOTEBOOKS)


def listing(folder: Path) -> dict[str, int]:
    """Every file and folder under `folder` with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def tables(results: Path) -> dict[str, bytes]:
    """The studies' CSV tables, README snippets and parameter records (not the runs or executed notebooks)."""
    return {str(p.relative_to(results)): p.read_bytes() for p in sorted(results.glob("*/*"))
            if p.parent.name not in ("runs", "notebooks")}


@pytest.mark.slow
@pytest.mark.parametrize("group", SMOKE_GROUPS)
def test_smoke_run_from_the_notebooks_folder_then_reuse(group, tmp_path, data_cache_root):
    """`make smoke` with the kernels in `notebooks/`, where Jupyter runs them: each notebook executes with tiny
    parameters, writes its CSVs, README table and figures to the folders it is given and nothing under
    `notebooks/`. Run again in reuse mode (`make figures REUSE=1`; the notebooks in REUSE), it trains and
    measures nothing, draws its figures again and writes the same tables, byte for byte.

    The notebook kernels inherit MULTINORM_DATA from `data_cache_root`, so they read the corpus built once per run."""
    names = SMOKE_GROUPS[group]
    results, figures = tmp_path / "results", tmp_path / "figures"
    before = listing(NOTEBOOK_DIR)
    run_all("smoke", results, figures, only=names, cwd=NOTEBOOK_DIR)
    assert listing(NOTEBOOK_DIR) == before
    drawn = {p.name for p in figures.iterdir()}
    for name in names:
        study, stem = STUDY[name]
        assert list((results / study).glob("*.csv")), study
        assert (results / study / f"readme_{study}.md").read_text().strip()
        assert {f"{stem}.png", f"{stem}.pdf"} <= drawn
        executed = json.loads((results / "notebooks" / f"{name}.ipynb").read_text())
        errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"

    if group not in REUSE:
        return
    computed, runs = tables(results), listing(results / "runs")
    shutil.rmtree(figures)
    run_all("smoke", results, figures, only=REUSE[group], run_mode="reuse", cwd=NOTEBOOK_DIR)
    assert listing(results / "runs") == runs  # no run trained, resumed or measured again
    assert tables(results) == computed
    prefixes = tuple(name[:3] for name in REUSE[group])
    assert {p.name for p in figures.iterdir()} == {name for name in drawn if name.startswith(prefixes)}
    assert listing(NOTEBOOK_DIR) == before


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_a_reader_who_opens_a_notebook_finds_its_executed_copy(name):
    """notebooks/ holds code without outputs; the first cell of each study notebook, and README, link to the copy
    `make figures` executed, which is committed."""
    first = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4).cells[0]
    assert first.cell_type == "markdown" and f"](../results/notebooks/{name}.ipynb)" in first.source
    readme = (NOTEBOOK_DIR.parent / "README.md").read_text()
    assert f"](results/notebooks/{name}.ipynb)" in readme
    executed = NOTEBOOK_DIR.parent / "results" / "notebooks" / f"{name}.ipynb"
    assert executed.exists()
    outputs = [o for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code" for o in c.outputs]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
