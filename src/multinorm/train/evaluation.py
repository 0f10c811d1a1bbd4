"""The validation loss of a run (one process or several)."""

from __future__ import annotations

import torch

from multinorm.parallel import Parallel

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, batch_size: int, device: torch.device, mode: str = "exact",
             parallel: Parallel | None = None) -> float:
    """Mean validation loss per predicted token on the fixed validation set.

    `mode="galore_compat"` reproduces the GaLore evaluator's quirk (docs/benchmark.md#the-galore-evaluator-quirk): the mean of
    per-batch mean losses divided by n + 1 for n batches, which biases the perplexity low.
    With `parallel` (several ranks) rank r evaluates batches r, r + N, ... and the sums are added up over
    the ranks: the same batches and the same result as one process. Under FSDP2 a forward pass is a
    collective, so a rank left without a batch in the last round runs one more forward and ignores it.
    """
    par = parallel or Parallel()
    was_training = model.training
    model.eval()
    total_loss, total_count, batch_losses = 0.0, 0, []
    batches = data.val_batches(batch_size)
    if par.distributed:
        batches = list(batches)
        rounds = -(-len(batches) // par.world)
        spare = batches[:1] * (rounds - len(batches[par.rank::par.world])) if par.mode == "fsdp" else []
        for input_ids, _ in spare:
            model(input_ids=input_ids.to(device))
        batches = batches[par.rank::par.world]
    for input_ids, labels in batches:
        input_ids, labels = input_ids.to(device), labels.to(device)
        loss = model(input_ids=input_ids, labels=labels).loss.float().item()
        count = int((labels[:, 1:] != -100).sum())
        total_loss += loss * count
        total_count += count
        batch_losses.append(loss)
    model.train(was_training)
    batch_sum, n_batches = sum(batch_losses), len(batch_losses)
    if par.distributed:
        total_loss, total_count, batch_sum, n_batches = par.sum([total_loss, total_count, batch_sum, n_batches])
    if total_count == 0:
        raise ValueError("the validation set is empty")
    if mode == "galore_compat":
        return batch_sum / (n_batches + 1)
    return total_loss / total_count
