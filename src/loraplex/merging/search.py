"""`MergeMethod.WEIGHTS_SEARCH`: one weight per adapter, chosen so the merged model keeps as much as possible of the
adapter that keeps least.

Each adapter's held-out split is cut in two: even rows for the search, odd rows for the report, so the figures
a merge reports come from rows the search never saw. On the search rows, base+adapters (every adapter active at
its weight: the merged model, exactly, for a sum) is scored by the worst retention over the adapters,
(base loss − merged loss) / (base loss − adapter loss), and a coordinate search over GRID keeps the best
weights (gradient-free: only held-out losses are read). Along one adapter's weight it climbs: from the current
grid point towards the better neighbour, while the score rises (each weighting tried costs one held-out pass
over the search rows, so a climb tries a few weightings where a sweep of the grid tried them all).
"""
from __future__ import annotations

import torch

from ..data.prepare import decision_rows, graded_rows
from ..errors import LoraplexError
from ..lm.packed import heldout_metrics
from ..timing import phase
from .plan import MergePlan
from .verify import all_adapters_active, base_and_adapter_loss, heldout_splits

GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
ROUNDS = 2  # passes over the adapters
MIN_ROWS = 4  # per held-out split: two to search on, two to report on


def halves(plan: MergePlan) -> tuple[dict, dict]:
    """(search rows, report rows) per adapter: the even and the odd rows of its held-out split."""
    search, report, problems = {}, {}, []
    for name, split in heldout_splits(plan).items():
        if isinstance(split, str):
            problems.append(f"{name}: {split}")
        elif len(split) < MIN_ROWS:
            problems.append(f"{name}: {len(split)} held-out rows; the search needs at least {MIN_ROWS}")
        else:
            search[name], report[name] = decision_rows(split), graded_rows(split)
    if problems:
        raise LoraplexError(problems, title="method='weights-search' scores weights on each adapter's held-out split")
    return search, report


@torch.no_grad()
@phase("weight search")
def search_weights(plan: MergePlan, reference, search: dict) -> dict:
    """Set `plan.weights` to the weights that maximise the worst retention on `search`; returns the record."""
    losses = {n: base_and_adapter_loss(reference, n, rows) for n, rows in search.items()}
    base = {n: b for n, (b, _) in losses.items()}
    gains = {n: b - own for n, (b, own) in losses.items() if b - own > 0}
    searched_rows = {n: len(r) for n, r in search.items()}
    if not gains:  # nothing to keep: the plain sum
        plan.weights = {n: 1.0 for n in plan.adapters}
        return {"weights": plan.weights, "grid": list(GRID), "evaluations": 0, "search_rows": searched_rows,
                "worst_retention_search": None,
                "note": "no adapter improves on the base on its search rows: weights stay 1"}
    seen: dict[tuple, float] = {}

    def worst(weights: dict[str, float]) -> float:
        key = tuple(weights[n] for n in plan.adapters)
        if key not in seen:
            plan.weights = dict(weights)
            with all_adapters_active(reference, plan):
                seen[key] = min((base[n] - heldout_metrics(reference, search[n])["loss"]) / gains[n] for n in gains)
        return seen[key]

    best = {n: 1.0 for n in plan.adapters}
    start = worst(best)
    for _ in range(ROUNDS):
        for name in plan.adapters:
            best = _climb(best, name, worst)
    plan.weights = best
    return {"weights": best, "grid": list(GRID), "evaluations": len(seen), "search_rows": searched_rows,
            "worst_retention_search": {"at_weights_1": start, "found": worst(best)}}


def _climb(best: dict[str, float], name: str, score) -> dict[str, float]:
    """`best` with `name`'s weight moved along GRID while `score` rises: first downwards, else upwards."""
    at = GRID.index(best[name])
    here = score(best)
    for step in (-1, 1):
        moved = False
        while 0 <= at + step < len(GRID) and score(candidate := {**best, name: GRID[at + step]}) > here:
            best, at, here, moved = candidate, at + step, score(candidate), True
        if moved:
            break
    return best
