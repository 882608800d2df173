"""Held-out metrics on answer tokens: mean loss, perplexity, token accuracy.

Training reports its held-out loss through this same function, so the evaluation matrix's diagonal
equals the numbers recorded at training time.
"""
from __future__ import annotations

import math

import torch

from .train.batching import PackedCollator, answer_loss_sum


@torch.no_grad()
def heldout_metrics(model, dataset, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean loss over every answer token of `dataset` (rows with input_ids, labels)."""
    if dataset is None or len(dataset) == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "token_accuracy": float("nan"), "tokens": 0}
    was_training = model.training
    model.eval()
    collate = PackedCollator()
    device = next(model.parameters()).device
    total, count, correct = 0.0, 0, 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        loss, n, right = answer_loss_sum(model, batch)
        total, count, correct = total + float(loss), count + n, correct + right
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "token_accuracy": correct / max(count, 1),
            "tokens": count}
