"""From `results/` to figures and README tables: one plotting style, crossing points, README sections.

Nothing here trains or normalises anything; it reads files that `train`, `sweep` and `bench` wrote.
README sections between `<!-- results:NAME -->` and `<!-- /results:NAME -->` markers are rewritten by
`update_readme` from CSV files, so no number in README is typed by hand.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["set_style", "save_figure", "tokens_to_reach", "markdown_table", "replace_section", "update_readme",
           "METHOD_LABELS", "method_label"]

METHOD_LABELS = {
    "adamw": "AdamW", "sgd": "SGD", "sinkgd": "SinkGD", "swan": "SWAN", "swan-nsds": "SWAN (NSDS)",
    "mngd": "MNGD", "muon": "Muon", "galore": "GaLore", "apollo": "APOLLO", "apollo-mini": "APOLLO-Mini",
    "fira": "Fira",
    # AdamW with its own lr on the hidden matrices and the tuned AdamW lr on the rest: the same two-lr
    # freedom as every mixed method, so the baseline is not handicapped by sharing one lr.
    "adamw-split": "AdamW (split lr)",
    # A control: AdamW on embeddings/head/norms only, hidden matrices at lr 0.
    "frozen-hidden": "hidden frozen (control)",
}


def method_label(name: str) -> str:
    return METHOD_LABELS.get(name, name)


def set_style() -> None:
    """The one style of every figure: seaborn whitegrid, readable fonts, a fixed palette per method."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", palette="colorblind")
    mpl.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
                         "axes.titleweight": "bold", "legend.frameon": False})


def method_colors(methods: Sequence[str]) -> dict[str, tuple]:
    import seaborn as sns

    order = list(METHOD_LABELS)
    # colorblind has 10 colours; the dark variant extends it so no two known methods share one
    palette = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 10)
    return {m: palette[order.index(m)] if m in order else palette[-1] for m in methods}


def save_figure(fig, name: str, figures_dir: str | Path = "figures") -> list[Path]:
    """Write `figures/<name>.png` and `.pdf`; return the paths."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    paths = [figures_dir / f"{name}.png", figures_dir / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    return paths


def tokens_to_reach(tokens: Sequence[float], losses: Sequence[float], target: float) -> float:
    """First token count at which the loss curve reaches `target`, interpolated linearly between evaluations.

    Returns NaN when the curve never gets there (docs/benchmark.md#token-efficiency-speed-up: T_method(PPL*)).
    """
    tokens, losses = np.asarray(tokens, dtype=float), np.asarray(losses, dtype=float)
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(tokens[0])
            t0, t1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], losses[i]
            return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1))
    return math.nan


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
