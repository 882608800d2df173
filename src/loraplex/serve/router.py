"""`model: auto` in the server: `loraplex.routing.Router` over the served run, embedding with the served base.

See `loraplex.routing` for the rule. The router is built when the server starts, from each adapter's training
prompts; it embeds on the same model the worker generates with, under the same lock.
"""
from __future__ import annotations

import torch

from ..routing import BASE, DEFAULT_THRESHOLD, Router, mean_hidden_state
from .engine import PEFT_BASE

RULE = ("nearest centroid of the adapters' training prompts (base model, mean-pooled last hidden states, centered "
        "cosine); below the threshold: base")


class ServedRouter:
    def __init__(self, engine, router: Router):
        self.engine, self.router = engine, router

    @property
    def threshold(self) -> float:
        return self.router.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.router.threshold = value

    @classmethod
    def build(cls, engine, threshold: float = DEFAULT_THRESHOLD) -> "ServedRouter":
        ws = engine.workspace
        names = [n for n, e in engine.entries.items() if e.kind == "adapter"]
        specs = {s.name: s for s in ws.recipe.datasets if s.name in names}
        prepared = ws.prepare() if specs else {}
        files = {name: tuple(spec.files("path")) for name, spec in specs.items()}
        heldout = {name: engine.entries[name].info.get("heldout_loss") for name in specs}
        return cls(engine, Router.build(lambda ids: embed(engine, ids), prepared, files, heldout, threshold))

    def route(self, prompt: str) -> tuple[str, float]:
        """(the adapter to answer with, or `base`; the centered cosine similarity to its centroid)."""
        return self.router.route_ids(self.engine.encode(self.engine.entries[BASE], prompt))

    def describe(self) -> dict:
        return {"id": "auto", "object": "model", "created": 0, "owned_by": "loraplex",
                "loraplex": {"kind": "router", "threshold": self.router.threshold,
                             "routes_to": sorted(self.router.centroids), "same_data_file": self.router.groups,
                             "rule": RULE}}


@torch.no_grad()
def embed(engine, ids: list[int]) -> torch.Tensor:
    """The served base's mean-pooled last hidden states over `ids` (the worker generates on the same model)."""
    with engine.model_lock:
        if engine.mixed:
            return mean_hidden_state(engine.models["run"], ids, adapter_names=[PEFT_BASE])
        engine.adapters.use(None)
        try:
            return mean_hidden_state(engine.models["run"], ids)
        finally:
            engine.adapters.use(engine.adapters.names[0])
