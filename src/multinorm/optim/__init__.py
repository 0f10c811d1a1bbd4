"""Stateless multi-normalized optimizers (SinkGD, SWAN, MNGD), the optimizer registry and builder.

``build_optimizer(model, name, lr, **hparams)`` returns one optimizer over a LLaMA's trainable parameters
(the named method on the hidden matrices, AdamW on the rest); ``OPTIMIZERS`` lists the names.
``split_parameters`` / ``is_hidden_matrix`` hold the routing rule. Importing this package does not import
``transformers``.
"""

from .base import StatelessMatrixOptimizer
from .build import OPTIMIZERS, OptimizerSpec, adamw_implementation, build_optimizer, describe_optimizer
from .combined import CombinedOptimizer, optimizer_state_bytes
from .grouping import HIDDEN_MATRIX_NAMES, is_hidden_matrix, split_parameters
from .mngd import MNGD
from .sinkgd import SinkGD
from .swan import SWAN, swan_direction

__all__ = [
    "SinkGD",
    "SWAN",
    "MNGD",
    "StatelessMatrixOptimizer",
    "swan_direction",
    "CombinedOptimizer",
    "optimizer_state_bytes",
    "OptimizerSpec",
    "OPTIMIZERS",
    "build_optimizer",
    "adamw_implementation",
    "describe_optimizer",
    "split_parameters",
    "is_hidden_matrix",
    "HIDDEN_MATRIX_NAMES",
]
