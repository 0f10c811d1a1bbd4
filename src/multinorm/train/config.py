"""A run's settings: :class:`TrainConfig` (field names are the CLI flags with '-' for '_'), checked by
:meth:`TrainConfig.validate` before any work, and :class:`ConfigError`, a bad setting reported in one line."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from multinorm.data import DATASETS
from multinorm.llama import MODEL_CONFIGS
from multinorm.optim import OPTIMIZERS
from multinorm.parallel import MODES

__all__ = ["DTYPES", "ConfigError", "TrainConfig", "one_line"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ConfigError(ValueError):
    """A bad setting, reported as one line by the CLI."""


@dataclass
class TrainConfig:
    """Everything that defines a run. Field names are the CLI flags with '-' for '_'."""

    model: str = "nano"
    dataset: str = "wiki-sample"
    data_files: str | None = None
    vocab_size: int = 4096
    seq_len: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    hparams: dict[str, Any] = field(default_factory=dict)
    tokens: int = 2_000_000
    batch_size: int = 16
    grad_accum: int = 1
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    eval_interval: int = 50
    eval_tokens: int | None = 131_072
    eval_batch_size: int = 16
    eval_mode: str = "exact"
    log_interval: int = 10
    checkpoint_interval: int = 0
    save_checkpoint: bool = True
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    results_dir: str = "results/runs"
    run_id: str | None = None
    cache_dir: str | None = None
    progress: bool = True
    parallel: str | None = None

    def __post_init__(self) -> None:
        # A learning rate computed with numpy or pandas (a grid times a tuned lr) is a numpy scalar; it would
        # reach the optimizer's param_groups and make every checkpoint refuse to load with weights_only=True.
        self.lr = _plain(self.lr)
        self.hparams = {key: _plain(value) for key, value in self.hparams.items()}

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if self.device.startswith("cuda") else "fp32"

    def default_run_id(self) -> str:
        return f"{self.model}-{self.dataset}-{self.optimizer}-lr{self.lr:g}-seed{self.seed}"

    def validate(self) -> None:
        """Reject bad settings before any work is done, with a message that names the fix."""
        if self.model not in MODEL_CONFIGS:
            raise ConfigError(f"unknown model {self.model!r}; valid models: {', '.join(MODEL_CONFIGS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(DATASETS)}")
        max_pos = MODEL_CONFIGS[self.model].max_position_embeddings
        if not 1 <= self.seq_len <= max_pos:
            raise ConfigError(f"seq_len {self.seq_len} is outside 1..{max_pos}, the positions of model {self.model!r}")
        if not _finite_nonnegative(self.lr):
            raise ConfigError(f"lr must be a finite number >= 0, got {self.lr}")
        adam_lr = self.hparams.get("adam_lr")
        if adam_lr is not None and not _finite_nonnegative(adam_lr):
            raise ConfigError(f"adam_lr must be a finite number >= 0, got {adam_lr!r}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a positive multiple of grad_accum ({self.grad_accum})")
        if self.steps < 1:
            raise ConfigError(f"token budget {self.tokens:,} is smaller than one step "
                              f"({self.batch_size} x {self.seq_len} = {self.tokens_per_step:,} tokens)")
        if self.eval_interval < 1 or self.log_interval < 1 or self.checkpoint_interval < 0:
            raise ConfigError("eval_interval and log_interval must be >= 1, checkpoint_interval >= 0")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("warmup_frac must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.eval_mode not in ("exact", "galore_compat"):
            raise ConfigError(f"eval_mode must be 'exact' or 'galore_compat', got {self.eval_mode!r}")
        if self.resolved_dtype() not in DTYPES:
            raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        if self.parallel is not None and self.parallel not in MODES:
            raise ConfigError(f"unknown parallel mode {self.parallel!r}; valid: {', '.join(MODES)}")
        if self.parallel == "fsdp" and not OPTIMIZERS[self.optimizer].sharded:
            supported = ", ".join(name for name, spec in OPTIMIZERS.items() if spec.sharded)
            raise ConfigError(f"{self.optimizer} is not supported on FSDP2-sharded parameters (supported: "
                              f"{supported}); use --parallel ddp")


def _finite_nonnegative(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def one_line(exc: Exception) -> str:
    """An exception as one short line: torch's loading errors can span many lines of advice."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "").split(". ")[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
