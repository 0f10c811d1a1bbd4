"""README's examples: the first does what its comments say (SinkGD on the hidden matrices, AdamW on everything
else); the Train example uses the learning rates the convergence study tuned."""

import re
from pathlib import Path

import pandas as pd

import torch

from multinorm.llama import build_model
from multinorm.optim import SinkGD

README = Path(__file__).resolve().parents[1] / "README.md"


def first_python_block() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)


def test_the_first_readme_example_routes_only_hidden_matrices_to_sinkgd():
    model = build_model("nano", 256, seed=0)
    namespace = {"model": model}
    exec(first_python_block(), namespace)  # defines `opt` twice: by hand, then with build_optimizer
    # the hidden matrices of a LLaMA block, by name (written out here, not computed by the routing under test)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    hidden = {id(p) for n, p in model.named_parameters() if n.endswith(tuple(f"{x}.weight" for x in projections))}
    assert len(hidden) == 4 * len(projections)  # nano: 4 layers
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


def test_the_train_example_runs_sinkgd_at_the_tuned_learning_rates():
    block = re.search(r"## Train\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    command = block.replace("\\\n", " ").splitlines()[0]
    assert "--optimizer sinkgd" in command and "--model nano" in command
    lr = float(re.search(r"--lr (\S+)", command).group(1))
    adam_lr = float(re.search(r"--hparam adam_lr=(\S+)", command).group(1))
    tuned = pd.read_csv(README.parent / "results" / "convergence" / "best_lr.csv").set_index("method").lr
    assert (lr, adam_lr) == (tuned["sinkgd"], tuned["adamw"])
