"""Which adapter fits a prompt: the router behind `model: auto`, and how often it picks right.

Each adapter's training prompts (the tokens before the first answer token, where labels are -100), taken evenly
over the whole training split, are embedded by the base model (its last hidden states, mean-pooled over the
prompt) and averaged into one centroid per data file. Adapters trained on the same data file share a centroid,
which routes to the one with the best held-out loss. Each centroid gets a radius: a high quantile of the distances
of held-out prompts to it (every other held-out row; the rows between them are the ones routing accuracy is
measured on). A prompt goes to the centroid it is nearest to relative to that radius; farther than `threshold`
radii from every centroid (a question unlike all the adapters' data), the base answers instead. One adapter
alone routes and abstains the same way.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .data.prepare import decision_rows, graded_rows
from .data.render import IGNORE_INDEX
from .lm.packed import causal_lm, final_hidden_states, packed_attention

BASE = "base"
DEFAULT_THRESHOLD = 1.5  # farther than this many calibrated radii from every centroid: `auto` answers with the base
RADIUS_QUANTILE = 0.95  # the radius holds this share of the calibration prompts
PROMPTS_PER_ADAPTER = 64  # training prompts embedded per data file

# prompts' token ids -> the base model's mean-pooled last hidden states, one row per prompt: [prompts, hidden]
Embed = Callable[[list[list[int]]], torch.Tensor]


def spread(rows, count: int):
    """`count` rows taken evenly over the whole of `rows` (a datasets.Dataset), not its first ones."""
    if len(rows) <= count:
        return rows
    return rows.select(sorted({round(i * (len(rows) - 1) / (count - 1)) for i in range(count)}))


def calibration_rows(val):
    """The held-out rows that calibrate the router's radii: every other one (the rest measure its accuracy)."""
    return decision_rows(val) if val is not None and len(val) >= 2 else None


def measured_rows(val):
    """The held-out rows routing accuracy is measured on: those `calibration_rows` leaves out."""
    return graded_rows(val) if val is not None and len(val) >= 2 else val


class Router:
    def __init__(self, embed: Embed, centroids: dict[str, torch.Tensor], radii: dict[str, float], threshold: float,
                 groups: dict[str, list[str]]):
        self.embed, self.centroids, self.radii, self.threshold, self.groups = (embed, centroids, radii, threshold,
                                                                               groups)

    @classmethod
    def build(cls, embed: Embed, prepared: dict, files: dict[str, tuple], heldout: dict[str, float | None],
              threshold: float = DEFAULT_THRESHOLD) -> "Router":
        """`prepared`, `files`, `heldout`: per adapter, its PreparedDataset, data files and held-out loss."""
        by_file: dict[tuple, list[str]] = {}
        for name, paths in files.items():
            by_file.setdefault(tuple(paths), []).append(name)
        centroids, radii, groups = {}, {}, {}
        for members in by_file.values():
            best = min(members, key=lambda n: heldout[n] if isinstance(heldout[n], (int, float)) else math.inf)
            rows = spread(prepared[best].train, PROMPTS_PER_ADAPTER)
            vectors = embed(_prompts(rows))
            centroid = vectors.mean(0)
            calibration = calibration_rows(prepared[best].val)
            # without held-out rows, the training prompts themselves (a tighter radius: fewer prompts routed)
            measured = embed(_prompts(calibration)) if calibration is not None else vectors
            distances = [float(torch.dist(v, centroid)) for v in measured]
            centroids[best], groups[best] = centroid, sorted(members)
            radii[best] = max(float(torch.quantile(torch.tensor(distances), RADIUS_QUANTILE)), 1e-6)
        return cls(embed, centroids, radii, threshold, groups)

    def route_vectors(self, vectors: dict[str, torch.Tensor]) -> tuple[str, float]:
        """(the adapter to answer with, or `base`; the prompt's distance to its centroid in calibrated radii).
        `vectors`: per centroid, the prompt embedded as that adapter's training prompts were."""
        if not self.centroids:
            return BASE, math.inf
        distances = {name: float(torch.dist(vectors[name], c)) / self.radii[name]
                     for name, c in self.centroids.items()}
        best = min(distances, key=distances.get)
        return (best if distances[best] <= self.threshold else BASE), distances[best]

    def route_ids(self, ids: list[int]) -> tuple[str, float]:
        vector = self.embed([ids])[0]
        return self.route_vectors({name: vector for name in self.centroids})

    def accuracy(self, rows, right: set[str]) -> dict:
        """Share of held-out `rows` (input_ids, labels) routed to one of the `right` adapters, and where all went."""
        routed: dict[str, int] = {}
        prompts = _prompts(rows)
        for vector in (self.embed(prompts) if prompts else []):
            picked, _ = self.route_vectors({name: vector for name in self.centroids})
            routed[picked] = routed.get(picked, 0) + 1
        total = sum(routed.values())
        hits = sum(count for name, count in routed.items() if name in right)
        return {"accuracy": hits / total if total else None, "prompts": total, "routed": routed}


def _prompts(rows) -> list[list[int]]:
    prompts = [prompt_ids(r["input_ids"], r["labels"]) for r in rows] if rows is not None else []
    return [ids for ids in prompts if ids]


def prompt_ids(input_ids: list[int], labels: list[int]) -> list[int]:
    """The prompt part of a tokenized example: everything before its first answer token."""
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return list(input_ids[:first])


@torch.no_grad()
def mean_hidden_states(model, prompts: list[list[int]], max_tokens: int = 4096, **forward) -> torch.Tensor:
    """The model's last hidden states over each prompt, mean-pooled: [len(prompts), hidden] (float32, on the CPU).

    The prompts run packed, several to a row of at most `max_tokens` tokens, each attending only to itself
    (`packed_attention`, as in training): one forward pass per row instead of one per prompt. `forward` goes to
    the model's call (one row: `adapter_names` of length 1)."""
    device = next(model.parameters()).device
    vectors = []
    for group in _packs(prompts, max_tokens):
        batch = {"input_ids": torch.tensor([[t for ids in group for t in ids]], device=device),
                 "position_ids": torch.tensor([[i for ids in group for i in range(len(ids))]], device=device)}
        with packed_attention(model, batch), final_hidden_states(causal_lm(model)) as captured:
            model(**batch, use_cache=False, logits_to_keep=1, **forward)
        hidden = captured[0][0].float()  # [tokens of the row, hidden]
        vectors += [part.mean(0).cpu() for part in hidden.split([len(ids) for ids in group])]
    return torch.stack(vectors) if vectors else torch.empty(0, causal_lm(model).config.hidden_size)


def _packs(prompts: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Consecutive prompts grouped into rows of at most `max_tokens` tokens (a longer prompt alone in its row)."""
    groups: list[list[list[int]]] = []
    for ids in prompts:
        if groups and sum(map(len, groups[-1])) + len(ids) <= max_tokens:
            groups[-1].append(ids)
        else:
            groups.append([ids])
    return groups
