"""From `results/` to figures and README tables: one plotting style, crossing points, README sections.

Nothing here trains or normalises anything; it reads files that `train`, `sweep` and `bench` wrote.
README sections between `<!-- results:NAME -->` and `<!-- /results:NAME -->` markers are rewritten by
`update_readme` from CSV files, so no number in README is typed by hand.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

__all__ = ["set_style", "save_figure", "reuse_tables", "markdown_table", "replace_section", "update_readme",
           "METHOD_LABELS", "METHOD_STYLES", "IMPLEMENTATIONS", "VARIANTS", "method_label", "method_style", "method_colors"]

METHOD_LABELS = {
    "adamw": "AdamW", "sgd": "SGD", "sinkgd": "SinkGD", "swan": "SWAN", "swan-nsds": "SWAN (NSDS)",
    "mngd": "MNGD", "muon": "Muon", "galore": "GaLore", "apollo": "APOLLO", "apollo-mini": "APOLLO-Mini",
    "fira": "Fira",
    # AdamW with its own lr on the hidden matrices and the tuned AdamW lr on the rest: the same two-lr
    # freedom as every mixed method, so the baseline is not handicapped by sharing one lr.
    "adamw-split": "AdamW (split lr)",
    # A control: AdamW on embeddings/head/norms only, hidden matrices at lr 0.
    "frozen-hidden": "hidden frozen (control)",
    # The fully stateless reading of SWAN-0 (memory accounting only; not an optimizer of the registry).
    "swan-0": "SWAN-0 (fully stateless)",
    # implementations compared by `make bench`
    "adamw-foreach": "AdamW (foreach)", "adamw-fused": "AdamW (fused)", "sinkgd-torch": "SinkGD (torch ops)",
    # the explanations of the scaling study (notebook 05)
    "sinkgd-momentum": "SinkGD + momentum", "sinkgd-paper": "SinkGD (paper's recipe)",
}


# One visual identity per method, used by every figure: colour, marker, line style. The AdamW forms are neutral
# greys (the baseline always looks the same), the control is dashed, and the methods that appear together in the
# convergence figures get clearly distinct hues (Okabe-Ito / seaborn "colorblind" first, then darker extras; no
# yellow, which does not read on white).
METHOD_STYLES: dict[str, dict[str, str]] = {
    "adamw": {"color": "#333333", "marker": "o", "ls": "-"},
    "adamw-split": {"color": "#8c8c8c", "marker": "s", "ls": "-"},
    "frozen-hidden": {"color": "#b0b0b0", "marker": "x", "ls": "--"},
    "sinkgd": {"color": "#0173b2", "marker": "D", "ls": "-"},
    "swan": {"color": "#de8f05", "marker": "^", "ls": "-"},
    "swan-nsds": {"color": "#d55e00", "marker": "<", "ls": "-"},
    "mngd": {"color": "#029e73", "marker": ">", "ls": "-"},
    "sgd": {"color": "#6b8e23", "marker": "v", "ls": "-"},
    "muon": {"color": "#cc78bc", "marker": "P", "ls": "-"},
    "galore": {"color": "#8c564b", "marker": "X", "ls": "-"},
    "apollo": {"color": "#17becf", "marker": "h", "ls": "-"},
    "apollo-mini": {"color": "#5e3c99", "marker": "p", "ls": "-"},
    "fira": {"color": "#c51b7d", "marker": "*", "ls": "-"},
    "swan-0": {"color": "#a6761d", "marker": "d", "ls": "-"},
    # another implementation of a method (IMPLEMENTATIONS): the method's colour, a marker of its own
    "adamw-foreach": {"color": "#333333", "marker": "8", "ls": "-"},
    "adamw-fused": {"color": "#333333", "marker": "H", "ls": "-"},
    "sinkgd-torch": {"color": "#0173b2", "marker": "+", "ls": "-"},
    # a variant of a method (VARIANTS, the scaling study's explanations): the method's colour, dashed, a star
    "sinkgd-momentum": {"color": "#0173b2", "marker": (4, 1, 0), "ls": "--"},
    "sinkgd-paper": {"color": "#0173b2", "marker": (6, 1, 0), "ls": "--"},
}
IMPLEMENTATIONS = {"adamw-foreach": "adamw", "adamw-fused": "adamw", "sinkgd-torch": "sinkgd"}
VARIANTS = {"sinkgd-momentum": "sinkgd", "sinkgd-paper": "sinkgd"}
_UNKNOWN_STYLE = {"color": "#000000", "marker": ".", "ls": ":"}


def method_label(name: str) -> str:
    return METHOD_LABELS.get(name, name)


def method_style(name: str) -> dict[str, str]:
    """``color``, ``marker``, ``ls`` and ``label`` of a method, the same in every figure (matplotlib kwargs)."""
    return {**METHOD_STYLES.get(name, _UNKNOWN_STYLE), "label": method_label(name)}


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """The fixed colour of each method (see :data:`METHOD_STYLES`)."""
    return {m: method_style(m)["color"] for m in methods}


def set_style() -> None:
    """The one style of every figure: seaborn whitegrid, readable fonts; colours per method from
    :func:`method_style`."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", palette="colorblind")
    mpl.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
                         "axes.titleweight": "bold", "axes.titlesize": 12, "axes.labelsize": 11,
                         "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 9,
                         "legend.frameon": False, "lines.linewidth": 1.8})


def save_figure(fig, name: str, figures_dir: str | Path = "figures") -> list[Path]:
    """Write `figures/<name>.png` and `.pdf`; return the paths."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    paths = [figures_dir / f"{name}.png", figures_dir / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    return paths


def reuse_tables(folder: str | Path, run_mode: str, parameters: dict[str, Any]) -> bool:
    """Whether a study reads its computed tables back from `folder` (`run_mode` "reuse") instead of computing them.

    For the studies whose tables come from computations other than training runs (the fixed-point and memory
    notebooks): computing them records `parameters` in `folder/parameters.json`; reusing them requires the same
    parameters, so no text is written about tables computed with other ones. Tables recorded without that file
    are read unchecked, with a note. (pandas reads back the very floats `to_csv` wrote, so reused tables give the
    same numbers.)
    """
    record = Path(folder) / "parameters.json"
    parameters = json.loads(json.dumps(parameters))  # as recorded: tuples become lists
    if run_mode != "reuse":
        record.write_text(json.dumps(parameters, indent=1, sort_keys=True) + "\n")
        return False
    if not record.exists():
        print(f"note: {record} is missing; the tables in {folder} are reused without checking their parameters")
        return True
    recorded = json.loads(record.read_text())
    changed = sorted(k for k in parameters.keys() | recorded.keys() if parameters.get(k) != recorded.get(k))
    if changed:
        raise ValueError(f"reuse: the tables in {folder} were computed with other parameters ("
                         + ", ".join(f"{k}: {recorded.get(k)!r} there, {parameters.get(k)!r} now" for k in changed)
                         + "); compute them again (run mode 'train') or run with the recorded parameters")
    return True


def _fmt(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, float) and math.isinf(value):
        return "diverged"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return f"{value:.2g}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table with compact number formatting."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def replace_section(text: str, name: str, content: str) -> str:
    """Replace what lies between the `results:name` markers of `text` (which must exist)."""
    pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n).*?(<!-- /results:{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no section markers for {name!r}")
    return pattern.sub(lambda m: m.group(1) + content.strip() + "\n" + m.group(2), text)


def update_readme(readme: str | Path = "README.md", results_dir: str | Path = "results") -> list[str]:
    """Rewrite every README results section for which `results/<study>/readme_<name>.md` exists.

    Each study notebook writes its README snippet(s) as markdown files built from its CSVs; this
    function only pastes them between the markers. Returns the names of the sections updated.
    """
    readme, results_dir = Path(readme), Path(results_dir)
    text = readme.read_text()
    updated = []
    for snippet in sorted(results_dir.glob("*/readme_*.md")):
        name = snippet.stem.removeprefix("readme_")
        if f"<!-- results:{name} -->" in text:
            text = replace_section(text, name, snippet.read_text())
            updated.append(name)
    readme.write_text(text)
    return updated
