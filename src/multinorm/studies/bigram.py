"""The count-bigram reference: how well the previous token alone predicts the next one.

A network that ends above this line has learnt less than a table of token-pair counts, so the studies draw it
in every convergence figure and require the tuned baseline to end clearly below it (notebook 02, "Choosing the
regime"). The model is add-k smoothed,

    p(b | a) = (count(a, b) + k) / (count(a) + k V),

fitted on the training blocks and scored on exactly the validation pairs the trainer scores: within each
validation block, every token but the first, predicted from the one before it. ``k`` is chosen on the
validation tokens themselves, which makes the reference as strong as an add-k bigram can be (a stricter bar
for the networks, never a weaker one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bigram_loss"]


def _pairs(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blocks = np.asarray(blocks, dtype=np.int64)
    return blocks[:, :-1].ravel(), blocks[:, 1:].ravel()


def bigram_loss(train_blocks: np.ndarray, val_blocks: np.ndarray, vocab_size: int,
                ks: Sequence[float] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)) -> dict[str, float]:
    """Mean validation loss (nats per predicted token) of the add-k bigram, at the best ``k`` in ``ks``.

    Returns ``{"loss": ..., "k": ..., "val_pairs": ..., "train_pairs": ...}``. Blocks are ``[n, seq_len]``
    token ids, as in :class:`multinorm.data.PackedLMData`.
    """
    prev, nxt = _pairs(train_blocks)
    if prev.size == 0:
        raise ValueError("bigram_loss needs training blocks of at least two tokens")
    if not ks or min(ks) <= 0:
        raise ValueError(f"ks must be positive smoothing constants, got {list(ks)}")
    counts = np.zeros((vocab_size, vocab_size), dtype=np.float64)
    np.add.at(counts, (prev, nxt), 1.0)
    row_totals = counts.sum(axis=1)
    vp, vn = _pairs(val_blocks)
    if vp.size == 0:
        raise ValueError("bigram_loss needs validation blocks of at least two tokens")
    pair_counts, totals = counts[vp, vn], row_totals[vp]
    losses = {k: float(-np.mean(np.log((pair_counts + k) / (totals + k * vocab_size)))) for k in ks}
    best = min(losses, key=losses.get)
    return {"loss": losses[best], "k": best, "val_pairs": int(vp.size), "train_pairs": int(prev.size)}
