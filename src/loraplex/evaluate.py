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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy continuations of rendered prompts, batched with left padding."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(e for e in eos if e is not None),
                                 temperature=None, top_p=None, top_k=None)
            new = ids[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [o.strip() for o in outputs]


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)
