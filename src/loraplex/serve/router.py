"""`model: auto`: pick the adapter whose training prompts look most like the request's prompt.

Built when the server starts: each adapter's training prompts (the tokens before the first answer token, where
labels are -100) are embedded by the base model (its last hidden states, mean-pooled over the prompt) and averaged
into one centroid per data file. Adapters trained on the same data file share a centroid, which routes to the one
with the best held-out loss. A request's prompt is embedded the same way and goes to the nearest centroid by cosine
similarity, all embeddings first centered on the mean of every training prompt's (what all prompts share, the chat
template above all, says nothing about which adapter fits). Below `threshold` the base answers instead.
"""
from __future__ import annotations

import math

import torch

from ..data.render import IGNORE_INDEX
from .engine import BASE, PEFT_BASE

DEFAULT_THRESHOLD = 0.2  # centered cosine similarity below which `auto` answers with the base
PROMPTS_PER_ADAPTER = 64  # training prompts embedded per data file


class Router:
    def __init__(self, engine, centroids: dict[str, torch.Tensor], center: torch.Tensor, threshold: float,
                 groups: dict[str, list[str]]):
        self.engine, self.centroids, self.center, self.threshold, self.groups = (engine, centroids, center,
                                                                                 threshold, groups)

    @classmethod
    def build(cls, engine, threshold: float = DEFAULT_THRESHOLD) -> "Router":
        ws = engine.workspace
        names = [n for n, e in engine.entries.items() if e.kind == "adapter"]
        specs = {s.name: s for s in ws.recipe.datasets if s.name in names}
        prepared = ws.prepare() if specs else {}
        by_file: dict[tuple, list[str]] = {}
        for name, spec in specs.items():
            by_file.setdefault(tuple(spec.files("path")), []).append(name)
        centroids, groups, every = {}, {}, []
        for members in by_file.values():
            losses = {n: engine.entries[n].info.get("heldout_loss") for n in members}
            best = min(members, key=lambda n: losses[n] if isinstance(losses[n], (int, float)) else math.inf)
            rows = prepared[best].train.select(range(min(PROMPTS_PER_ADAPTER, len(prepared[best].train))))
            prompts = [_prompt_part(r["input_ids"], r["labels"]) for r in rows]
            vectors = torch.stack([engine_embed(engine, ids) for ids in prompts if ids])
            every.append(vectors)
            centroids[best], groups[best] = vectors.mean(0), sorted(members)
        center = torch.cat(every).mean(0) if every else torch.zeros(1)
        return cls(engine, centroids, center, threshold, groups)

    def route(self, prompt: str) -> tuple[str, float]:
        """(the adapter to answer with, or `base`; the centered cosine similarity to its centroid)."""
        ids = self.engine.encode(self.engine.entries[BASE], prompt)
        vector = engine_embed(self.engine, ids) - self.center
        scores = {name: float(torch.nn.functional.cosine_similarity(vector, c - self.center, dim=0))
                  for name, c in self.centroids.items()}
        if not scores:
            return BASE, 0.0
        best = max(scores, key=scores.get)
        return (best if scores[best] >= self.threshold else BASE), scores[best]

    def describe(self) -> dict:
        return {"id": "auto", "object": "model", "created": 0, "owned_by": "loraplex",
                "loraplex": {"kind": "router", "threshold": self.threshold, "routes_to": sorted(self.centroids),
                             "same_data_file": self.groups,
                             "rule": "nearest centroid of the adapters' training prompts (base model, mean-pooled "
                                     "last hidden states, centered cosine); below the threshold: base"}}


def _prompt_part(input_ids: list[int], labels: list[int]) -> list[int]:
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return list(input_ids[:first])


@torch.no_grad()
def engine_embed(engine, ids: list[int]) -> torch.Tensor:
    """The base model's last hidden states over `ids`, mean-pooled (float32, on the CPU)."""
    model = engine.models["run"]
    device = next(model.parameters()).device
    with engine.model_lock:  # the worker thread generates on the same model
        extra = {"adapter_names": [PEFT_BASE]} if engine.mixed else {}
        if not engine.mixed:
            engine.adapters.use(None)
        try:
            out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True, logits_to_keep=1,
                        **extra)
        finally:
            if not engine.mixed:
                engine.adapters.use(engine.adapters.names[0])
    return out.hidden_states[-1][0].float().mean(0).cpu()
