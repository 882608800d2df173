"""Batches and the answer-only loss.

Padding-free packing: a batch of sequences becomes one row `[1, total_tokens]` whose position ids
restart at 0 for each sequence; transformers turns such position ids into a block-diagonal causal mask,
so no token attends across sequences and no compute is spent on padding. The padded collator is kept
for comparison (`train.packing: false`).

The loss runs the LM head only on positions that have a label (the prompt's positions have none),
which saves the vocabulary projection for most tokens of an SFT batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.render import IGNORE_INDEX


@dataclass
class PackedCollator:
    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, labels, positions = [], [], []
        for f in features:
            ids = list(f["input_ids"])
            lab = list(f["labels"])
            lab[0] = IGNORE_INDEX  # never predict a sequence's first token from the previous sequence
            input_ids += ids
            labels += lab
            positions += range(len(ids))
        return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


@dataclass
class PaddedCollator:
    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id)
        labels = torch.full((len(features), width), IGNORE_INDEX)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def causal_lm(model):
    """The causal LM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Sum of next-token cross-entropy over labelled positions, their count, and correct predictions.

    The decoder runs on every token; the LM head only on positions whose next token has a label.
    """
    lm = causal_lm(model)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state  # [B, T, H]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    picked = hidden[:, :-1][keep]  # [N, H]
    logits = lm.get_output_embeddings()(picked).float()  # [N, V]
    scaling = getattr(lm.config, "logits_scaling", None)  # e.g. Granite divides logits
    if scaling:
        logits = logits / scaling
    cap = getattr(lm.config, "final_logit_softcapping", None)  # e.g. Gemma 2
    if cap:
        logits = torch.tanh(logits / cap) * cap
    wanted = targets[keep]
    loss = F.cross_entropy(logits, wanted, reduction="sum")
    correct = int((logits.argmax(-1) == wanted).sum())
    return loss, int(keep.sum()), correct
