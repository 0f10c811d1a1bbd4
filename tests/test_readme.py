"""README's first example does what its comments say: SinkGD on the hidden matrices, AdamW on everything else."""

import re
from pathlib import Path

import torch

from multinorm.llama import build_model
from multinorm.optim import SinkGD, split_parameters

README = Path(__file__).resolve().parents[1] / "README.md"


def first_python_block() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)


def test_the_first_readme_example_routes_only_hidden_matrices_to_sinkgd():
    model = build_model("nano", 256, seed=0)
    namespace = {"model": model}
    exec(first_python_block(), namespace)  # defines `opt` twice: by hand, then with build_optimizer
    hidden = {id(p) for _, p in split_parameters(model)[0]}
    # The hand-built combination (the first `opt`) is rebuilt here exactly as the example does it.
    code = first_python_block().split("# The same recipe in one call")[0]
    by_hand = {"model": model}
    exec(code, by_hand)
    sinkgd = [o for o in by_hand["opt"].optimizers if isinstance(o, SinkGD)]
    assert len(sinkgd) == 1
    assert {id(p) for g in sinkgd[0].param_groups for p in g["params"]} == hidden
    others = [p for o in by_hand["opt"].optimizers if not isinstance(o, SinkGD) for g in o.param_groups for p in g["params"]]
    assert all(isinstance(o, (SinkGD, torch.optim.AdamW)) for o in by_hand["opt"].optimizers)
    assert {id(p) for p in others} == {id(p) for p in model.parameters()} - hidden
    # ... and the one-call version puts the same matrices in its "hidden" group.
    built = namespace["opt"]
    hidden_group = [g for g in built.param_groups if g.get("name") == "hidden"]
    assert {id(p) for g in hidden_group for p in g["params"]} == hidden
