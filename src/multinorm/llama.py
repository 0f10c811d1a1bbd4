"""Named LLaMA configurations built as `transformers.LlamaForCausalLM`, and the hidden-matrix split.

The paper sizes are the GaLore C4 benchmark's (Zhao et al., 2024), used by both SWAN (arXiv 2412.13148)
and SinkGD (arXiv 2502.06742): RMSNorm (eps 1e-6), SwiGLU MLP, RoPE, no biases, untied LM head,
vocabulary 32,000 (t5-base), init N(0, 0.02). The CPU sizes keep the same architecture at the shapes of
the benchmark's `llama_9m` and `llama_20m` configs, with the vocabulary taken from the tokenizer.

Parameter routing follows the benchmark: the Linear weights inside attention and MLP blocks
("hidden matrices") get the stateless update; embeddings, LM head and norms do not. The rule lives in
`multinorm.optim.grouping` (re-exported here as `split_parameters` and `HIDDEN_MATRIX_NAMES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers takes seconds to import: only the builders below need it
    from transformers import LlamaConfig, LlamaForCausalLM

from .optim.grouping import HIDDEN_MATRIX_NAMES, split_parameters  # re-exported for existing callers

__all__ = [
    "MODEL_CONFIGS",
    "HIDDEN_MATRIX_NAMES",
    "ModelShape",
    "llama_config",
    "build_model",
    "split_parameters",
    "count_parameters",
]


@dataclass(frozen=True)
class ModelShape:
    """The shape of one named LLaMA: hidden size d, MLP size f, heads, layers, vocabulary (None = tokenizer's)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int | None
    max_position_embeddings: int = 1024


MODEL_CONFIGS: dict[str, ModelShape] = {
    # CPU sizes: the block shapes of GaLore's llama_9m / llama_20m configs with the tokenizer's vocabulary (at a
    # 1,024-token vocabulary, 1.07 M and 3.69 M parameters: not 9M / 20M).
    "nano": ModelShape(128, 352, 4, 4, None),
    "micro": ModelShape(256, 688, 4, 4, None),
    # Paper sizes (GaLore benchmark configs llama_60m ... llama_1b).
    "60m": ModelShape(512, 1376, 8, 8, 32000),
    "130m": ModelShape(768, 2048, 12, 12, 32000),
    "350m": ModelShape(1024, 2736, 16, 24, 32000),
    "1b": ModelShape(2048, 5461, 32, 24, 32000),
}


def llama_config(name: str, vocab_size: int | None = None, max_position_embeddings: int | None = None) -> LlamaConfig:
    """The `LlamaConfig` of a named model. `vocab_size` is required for the CPU sizes and overrides the paper's."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_CONFIGS)}")
    shape = MODEL_CONFIGS[name]
    vocab = vocab_size if vocab_size is not None else shape.vocab_size
    if vocab is None:
        raise ValueError(f"model {name!r} takes its vocabulary size from the tokenizer; pass vocab_size")
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        num_hidden_layers=shape.num_hidden_layers,
        max_position_embeddings=max_position_embeddings or shape.max_position_embeddings,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        rope_theta=10000.0,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(
    name: str,
    vocab_size: int | None = None,
    *,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int | None = None,
) -> LlamaForCausalLM:
    """A freshly initialised `LlamaForCausalLM` of a named size.

    `device="meta"` builds the module without allocating weights (for parameter counts of the big sizes).
    With `seed`, initialisation is reproducible (the global torch RNG is seeded).
    """
    from transformers import LlamaForCausalLM

    config = llama_config(name, vocab_size, max_position_embeddings)
    config._attn_implementation = "sdpa"
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total, hidden matrices (stateless group) and the rest (embeddings, head, norms)."""
    hidden, rest = split_parameters(model)
    n_hidden = sum(p.numel() for _, p in hidden)
    n_rest = sum(p.numel() for _, p in rest)
    return {"total": n_hidden + n_rest, "hidden": n_hidden, "rest": n_rest}
