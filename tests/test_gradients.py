"""Gradient capture for the fixed-point study."""

import torch

from multinorm.studies.gradients import capture_gradients
from multinorm.llama import build_model, split_parameters
from multinorm.train import TrainConfig, train


def test_capture_gradients_of_the_initial_and_the_trained_model(tmp_path):
    cfg = TrainConfig(model="nano", seq_len=32, batch_size=2, tokens=2 * 32 * 3, eval_interval=3, eval_tokens=32 * 4,
                      eval_batch_size=4, lr=3e-3, results_dir=str(tmp_path), run_id="capture", progress=False)
    init = capture_gradients(cfg)
    hidden, _ = split_parameters(build_model("nano", 4096))
    assert list(init) == [name for name, _ in hidden]
    assert all(g.dtype == torch.float32 and g.isfinite().all() and g.abs().sum() > 0 for g in init.values())
    assert all(torch.equal(a, b) for a, b in zip(init.values(), capture_gradients(cfg).values()))
    assert not torch.equal(init[next(iter(init))], capture_gradients(cfg, step=1)[next(iter(init))])

    trained = capture_gradients(cfg, checkpoint=train(cfg).run_dir / "checkpoint.pt")
    assert trained.keys() == init.keys()
    assert not any(torch.equal(trained[k], init[k]) for k in init)
