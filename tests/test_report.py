"""The figures' visual language: one fixed style per method."""

import matplotlib.colors as mcolors

from multinorm.optim import OPTIMIZERS
from multinorm.studies.report import (IMPLEMENTATIONS, METHOD_STYLES, VARIANTS, method_colors, method_label,
                                     method_style)

STUDY_METHODS = ["adamw", "adamw-split", "frozen-hidden", "sgd", "sinkgd", "swan", "muon", "galore", "apollo-mini",
                 "apollo", "fira"]


def test_every_registry_optimizer_and_study_method_has_its_own_style():
    for name in [*OPTIMIZERS, *STUDY_METHODS]:
        assert name in METHOD_STYLES, name
        style = method_style(name)
        assert set(style) == {"color", "marker", "ls", "label"} and style["label"] == method_label(name)
    colors = [mcolors.to_hex(s["color"]) for name, s in METHOD_STYLES.items()
              if name not in IMPLEMENTATIONS and name not in VARIANTS]
    markers = [s["marker"] for s in METHOD_STYLES.values()]
    assert len(set(colors)) == len(colors) and len(set(markers)) == len(markers)
    for variant, method in {**IMPLEMENTATIONS, **VARIANTS}.items():  # the method's colour, a marker of its own
        assert METHOD_STYLES[variant]["color"] == METHOD_STYLES[method]["color"]
    for variant in VARIANTS:  # told apart from the method by a dashed line too
        assert METHOD_STYLES[variant]["ls"] == "--"


def test_baseline_is_neutral_and_the_control_dashed():
    for name in ("adamw", "adamw-split", "frozen-hidden"):
        r, g, b = mcolors.to_rgb(method_style(name)["color"])
        assert max(r, g, b) - min(r, g, b) < 0.02  # grey
    assert method_style("frozen-hidden")["ls"] == "--"
    assert all(method_style(m)["ls"] == "-" for m in STUDY_METHODS if m != "frozen-hidden")


def colour_distance(a, b):
    """Approximate perceptual distance of two colours ("redmean" weighting of RGB, 0-765)."""
    r1, g1, b1 = (255 * x for x in mcolors.to_rgb(a))
    r2, g2, b2 = (255 * x for x in mcolors.to_rgb(b))
    rm = (r1 + r2) / 2
    return ((2 + rm / 256) * (r1 - r2) ** 2 + 4 * (g1 - g2) ** 2 + (2 + (255 - rm) / 256) * (b1 - b2) ** 2) ** 0.5


def test_methods_compared_in_one_plot_are_far_apart_in_colour():
    colors = method_colors(STUDY_METHODS)
    for i, a in enumerate(STUDY_METHODS):
        for b in STUDY_METHODS[i + 1:]:
            assert colour_distance(colors[a], colors[b]) > 90, (a, b, colour_distance(colors[a], colors[b]))
