"""Which adapter fits a prompt: the router behind `model: auto`, and how often it picks right.

Each adapter's training prompts (the tokens before the first answer token, where labels are -100) are embedded
by the base model (its last hidden states, mean-pooled over the prompt) and averaged into one centroid per data
file. Adapters trained on the same data file share a centroid, which routes to the one with the best held-out
loss. A prompt is embedded the same way and goes to the nearest centroid by cosine similarity, all embeddings
first centered on the mean of every training prompt's (what all prompts share, the chat template above all, says
nothing about which adapter fits). Below `threshold` the base answers instead.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .data.render import IGNORE_INDEX
from .training.batching import causal_lm, final_hidden_states

BASE = "base"
DEFAULT_THRESHOLD = 0.2  # centered cosine similarity below which `auto` answers with the base
PROMPTS_PER_ADAPTER = 64  # training prompts embedded per data file

Embed = Callable[[list[int]], torch.Tensor]  # prompt token ids -> the base model's mean-pooled hidden state


class Router:
    def __init__(self, embed: Embed, centroids: dict[str, torch.Tensor], center: torch.Tensor, threshold: float,
                 groups: dict[str, list[str]]):
        self.embed, self.centroids, self.center, self.threshold, self.groups = (embed, centroids, center,
                                                                                threshold, groups)

    @classmethod
    def build(cls, embed: Embed, prepared: dict, files: dict[str, tuple], heldout: dict[str, float | None],
              threshold: float = DEFAULT_THRESHOLD) -> "Router":
        """`prepared`, `files`, `heldout`: per adapter, its PreparedDataset, data files and held-out loss."""
        by_file: dict[tuple, list[str]] = {}
        for name, paths in files.items():
            by_file.setdefault(tuple(paths), []).append(name)
        centroids, groups, every = {}, {}, []
        for members in by_file.values():
            best = min(members, key=lambda n: heldout[n] if isinstance(heldout[n], (int, float)) else math.inf)
            rows = prepared[best].train.select(range(min(PROMPTS_PER_ADAPTER, len(prepared[best].train))))
            prompts = [prompt_ids(r["input_ids"], r["labels"]) for r in rows]
            vectors = torch.stack([embed(ids) for ids in prompts if ids])
            every.append(vectors)
            centroids[best], groups[best] = vectors.mean(0), sorted(members)
        center = torch.cat(every).mean(0) if every else torch.zeros(1)
        return cls(embed, centroids, center, threshold, groups)

    def route_ids(self, ids: list[int]) -> tuple[str, float]:
        """(the adapter to answer with, or `base`; the centered cosine similarity to its centroid)."""
        vector = self.embed(ids) - self.center
        scores = {name: float(torch.nn.functional.cosine_similarity(vector, c - self.center, dim=0))
                  for name, c in self.centroids.items()}
        if not scores:
            return BASE, 0.0
        best = max(scores, key=scores.get)
        return (best if scores[best] >= self.threshold else BASE), scores[best]

    def accuracy(self, rows, right: set[str]) -> dict:
        """Share of held-out `rows` (input_ids, labels) routed to one of the `right` adapters, and where all went."""
        routed: dict[str, int] = {}
        for row in rows:
            picked, _ = self.route_ids(prompt_ids(row["input_ids"], row["labels"]))
            routed[picked] = routed.get(picked, 0) + 1
        total = sum(routed.values())
        hits = sum(count for name, count in routed.items() if name in right)
        return {"accuracy": hits / total if total else None, "prompts": total, "routed": routed}


def prompt_ids(input_ids: list[int], labels: list[int]) -> list[int]:
    """The prompt part of a tokenized example: everything before its first answer token."""
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return list(input_ids[:first])


@torch.no_grad()
def mean_hidden_state(model, ids: list[int], **forward) -> torch.Tensor:
    """The model's last hidden states over `ids`, mean-pooled (float32, on the CPU); `forward` goes to its call."""
    device = next(model.parameters()).device
    with final_hidden_states(causal_lm(model)) as captured:
        model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1, **forward)
    return captured[0][0].float().mean(0).cpu()
