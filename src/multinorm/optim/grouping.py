"""Which parameters are "hidden matrices" (the stateless update) and which are the rest (AdamW).

Routing is by parameter name, never by ``ndim`` alone: a LLaMA's ``lm_head`` is 2-D but is not a hidden
matrix. The default rule knows the Hugging Face LLaMA names; other models pass their own predicate
``is_hidden(name, param) -> bool`` to :func:`split_parameters` or :func:`multinorm.optim.build_optimizer`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["HIDDEN_MATRIX_NAMES", "is_hidden_matrix", "split_parameters"]

# Parameter-name suffixes of the attention and MLP projections of a Hugging Face LLaMA block.
HIDDEN_MATRIX_NAMES = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)

Named = list[tuple[str, nn.Parameter]]


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """True for the q, k, v, o, gate, up and down projection weights of a Hugging Face LLaMA block."""
    return name.endswith(HIDDEN_MATRIX_NAMES)


def split_parameters(
    model: nn.Module, is_hidden: Callable[[str, nn.Parameter], bool] = is_hidden_matrix
) -> tuple[Named, Named]:
    """Split the trainable parameters of ``model`` into (hidden matrices, the rest), as (name, param) lists.

    ``is_hidden(name, param)`` decides; frozen parameters are left out. Every trainable parameter lands in
    exactly one list (checked), a hidden parameter must have at least two dims, and finding no hidden
    matrix is an error, since it means the names did not match the rule.
    """
    hidden: Named = []
    rest: Named = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_hidden(name, param):
            if param.ndim < 2:
                raise ValueError(f"hidden matrix {name} has shape {tuple(param.shape)}, expected at least 2-D")
            hidden.append((name, param))
        else:
            rest.append((name, param))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    claimed = [id(p) for _, p in hidden + rest]
    if len(claimed) != len(set(claimed)) or set(claimed) != trainable:
        raise RuntimeError("parameter split does not claim every trainable parameter exactly once")
    if not hidden:
        if is_hidden is is_hidden_matrix:
            raise ValueError("no hidden matrices found: expected HF LLaMA parameter names such as "
                             "'model.layers.0.self_attn.q_proj.weight'; pass is_hidden=... for other models")
        raise ValueError("no hidden matrices found: is_hidden returned False for every trainable parameter")
    return hidden, rest
