"""`model: auto` in the server: `loraplex.routing.Router` over the served run, embedding with the served base.

See `loraplex.routing` for the rule. The router is built when the server starts, from each adapter's training
prompts and held-out prompts. Its forward passes run on the worker thread between two decoding steps
(`Engine.call_on_worker`), so a request for `auto` never waits for a running batch to end. A prompt is embedded
as each adapter's training prompts were: with that adapter's chat template and dataset system prompt.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import torch

from ..routing import DEFAULT_THRESHOLD, Router, mean_hidden_states
from ..lm.decoding import PEFT_BASE

RULE = ("nearest centroid of the adapters' training prompts (base model, mean-pooled last hidden states, euclidean "
        "distance in radii calibrated on held-out prompts); farther than the threshold from every centroid: base")


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
        return cls(engine, Router.build(lambda prompts: engine.call_on_worker(lambda: embed(engine, prompts)).result(),
                                        prepared, files, heldout, threshold))

    async def route(self, tokens: Callable[[object], Awaitable[list[int]]]) -> tuple[str, float]:
        """(the adapter to answer with, or `base`; the distance to its centroid in calibrated radii).
        `tokens(entry)`: the request's prompt token ids as that entry renders it."""
        vectors, embedded = {}, {}
        for name in self.router.centroids:
            ids = tuple(await tokens(self.engine.entries[name]))
            if ids not in embedded:
                future = self.engine.call_on_worker(lambda ids=ids: embed(self.engine, [list(ids)]))
                embedded[ids] = (await asyncio.wrap_future(future))[0]
            vectors[name] = embedded[ids]
        return self.router.route_vectors(vectors)

    def describe(self) -> dict:
        return {"id": "auto", "object": "model", "created": 0, "owned_by": "loraplex",
                "loraplex": {"kind": "router", "threshold": self.router.threshold,
                             "routes_to": sorted(self.router.centroids), "same_data_file": self.router.groups,
                             "rule": RULE}}


@torch.no_grad()
def embed(engine, prompts: list[list[int]]) -> torch.Tensor:
    """The served base's mean-pooled last hidden states over each prompt ([prompts, hidden]); called on the worker
    thread only."""
    if engine.mixed:
        return mean_hidden_states(engine.models["run"], prompts, adapter_names=[PEFT_BASE])
    active = engine.adapters.active  # the running batch's adapter (a DoRA run batches one adapter at a time)
    engine.adapters.use(None)
    try:
        return mean_hidden_states(engine.models["run"], prompts)
    finally:
        engine.adapters.use(active)
