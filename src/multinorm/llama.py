"""Named LLaMA configurations built as `transformers.LlamaForCausalLM`, and the hidden-matrix split.

The paper sizes are the GaLore C4 benchmark's (Zhao et al., 2024), used by both SWAN (arXiv 2412.13148)
and SinkGD (arXiv 2502.06742): RMSNorm (eps 1e-6), SwiGLU MLP, RoPE, no biases, untied LM head,
vocabulary 32,000 (t5-base), init N(0, 0.02). The CPU sizes keep the same architecture at the shapes of
the benchmark's `llama_9m` and `llama_20m` configs, with the vocabulary taken from the tokenizer.

Parameter routing follows the benchmark: the Linear weights inside attention and MLP blocks
("hidden matrices") get the stateless update; embeddings, LM head and norms do not. `lm_head` is 2-D,
so routing is by module name, never by `ndim` alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
    # CPU sizes (GaLore's llama_9m / llama_20m shapes); vocabulary from the tokenizer.
    "nano": ModelShape(128, 352, 4, 4, None),
    "micro": ModelShape(256, 688, 4, 4, None),
    # Paper sizes (GaLore benchmark configs llama_60m ... llama_1b).
    "60m": ModelShape(512, 1376, 8, 8, 32000),
    "130m": ModelShape(768, 2048, 12, 12, 32000),
    "350m": ModelShape(1024, 2736, 16, 24, 32000),
    "1b": ModelShape(2048, 5461, 32, 24, 32000),
}

# Module-name suffixes of the matrices that get the stateless update (HF LLaMA names).
HIDDEN_MATRIX_NAMES = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def llama_config(name: str, vocab_size: int | None = None, max_position_embeddings: int | None = None) -> LlamaConfig:
    """The `LlamaConfig` of a named model. `vocab_size` is required for the CPU sizes and overrides the paper's."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_CONFIGS)}")
    shape = MODEL_CONFIGS[name]
    vocab = vocab_size if vocab_size is not None else shape.vocab_size
    if vocab is None:
        raise ValueError(f"model {name!r} takes its vocabulary size from the tokenizer; pass vocab_size")
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
    config = llama_config(name, vocab_size, max_position_embeddings)
    config._attn_implementation = "sdpa"
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype)


def split_parameters(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    """Split trainable parameters into (hidden matrices, the rest), by module name.

    Hidden matrices are the q, k, v, o, gate, up and down projection weights of every block; the rest
    are embeddings, LM head and norm gains. Every trainable parameter lands in exactly one list
    (checked), and a model with no hidden matrices is rejected, since that means the names changed.
    """
    hidden, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(HIDDEN_MATRIX_NAMES):
            if param.ndim != 2:
                raise ValueError(f"hidden matrix {name} has shape {tuple(param.shape)}, expected 2-D")
            hidden.append((name, param))
        else:
            rest.append((name, param))
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    claimed = {id(p) for _, p in hidden} | {id(p) for _, p in rest}
    if len(claimed) != n_trainable or len(hidden) + len(rest) != n_trainable:
        raise RuntimeError("parameter split does not claim every trainable parameter exactly once")
    if not hidden:
        raise ValueError("no hidden matrices found: expected HF LLaMA module names such as "
                         "'model.layers.0.self_attn.q_proj.weight'")
    return hidden, rest


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total, hidden matrices (stateless group) and the rest (embeddings, head, norms)."""
    hidden, rest = split_parameters(model)
    n_hidden = sum(p.numel() for _, p in hidden)
    n_rest = sum(p.numel() for _, p in rest)
    return {"total": n_hidden + n_rest, "hidden": n_hidden, "rest": n_rest}
