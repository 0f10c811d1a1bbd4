"""Real gradients of a LLaMA's hidden matrices, for the fixed-point study (notebook 01)."""

from __future__ import annotations

from pathlib import Path

import torch

from multinorm.data import load_data
from multinorm.llama import build_model, split_parameters
from multinorm.train import DTYPES, TrainConfig, load_checkpoint

__all__ = ["capture_gradients"]


def capture_gradients(cfg: TrainConfig, checkpoint: str | Path | None = None, step: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of the hidden matrices on training batch `step`, for the model of `cfg`.

    The model is freshly initialised from `cfg.seed`, or loaded from `checkpoint` (a run's
    `checkpoint.pt`). Returns {parameter name: gradient} in float32 on the CPU.
    """
    cfg.validate()
    device = torch.device(cfg.device)
    data = load_data(cfg.dataset, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=cfg.seed,
                     data_files=cfg.data_files, cache_dir=cfg.cache_dir, val_tokens=cfg.eval_tokens)
    model = build_model(cfg.model, data.vocab_size, seed=cfg.seed, device=device, dtype=DTYPES[cfg.resolved_dtype()])
    if checkpoint is not None:
        model.load_state_dict(load_checkpoint(checkpoint)["model"])
    input_ids, labels = data.train_batch(step, cfg.batch_size)
    model(input_ids=input_ids.to(device), labels=labels.to(device)).loss.backward()
    hidden, _ = split_parameters(model)
    return {name: p.grad.detach().float().cpu() for name, p in hidden}
