"""`target_modules: auto`: probe every candidate module set, trial the best few, keep the winner.

The decision is cached under `$LORAPLEX_HOME/selections/` by everything it depends on (the base's and the
data's fingerprints, the `auto` settings, the LoRA and training settings): the same question is answered once.
"""
from __future__ import annotations

import hashlib
import json
import math
import time

import torch

from ..atomic import atomic_write_json
from ..data.prepare import PreparedDataset
from ..device import loraplex_home
from ..errors import RecipeError
from ..recipe import DatasetSpec
from ..targets import candidates as candidate_sets, default_budget, matched_alpha, references
from .probe import probe, score
from .trials import Trial, _Batches, rounds, run_trials, step_cost

VERSION = 1  # part of the cache key: a change to the method invalidates old decisions
PROBE_COST = 1.5  # a probe pass (forward, backward, weight gradients) against a LoRA training step, per token
EVAL_COST = 1 / 3  # a forward pass against a training step, per token
MIN_TRIAL_STEPS = 8  # a shorter trial ranks the sets by their first steps' noise: the probe decides alone


def cache_key(spec: DatasetSpec, data: PreparedDataset, base_fingerprint: str, micro_batch_tokens: int | None) -> str:
    settings = {"v": VERSION, "base": base_fingerprint, "data": data.fingerprint, "auto": spec.auto.model_dump(),
                "lora": spec.lora.model_dump(), "micro": micro_batch_tokens,
                "train": spec.train.model_dump(exclude={"logging_steps", "save_steps"})}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def full_training_tokens(spec: DatasetSpec, data: PreparedDataset) -> int:
    """Tokens the dataset's full training will run (epochs or max_steps)."""
    lengths = [len(ids) for ids in data.train["input_ids"]]
    t = spec.train
    if t.max_steps:
        return round(t.max_steps * t.batch_size * t.grad_accum * sum(lengths) / max(len(lengths), 1))
    return round(sum(lengths) * t.epochs)


def choose_modules(model, spec: DatasetSpec, data: PreparedDataset, base_fingerprint: str,
                   micro_batch_tokens: int | None, progress: bool = True) -> dict:
    """The decision record for `spec` (from the cache when the same question was answered before)."""
    key = cache_key(spec, data, base_fingerprint, micro_batch_tokens)
    path = loraplex_home() / "selections" / f"{key}.json"
    if path.is_file():
        return {**json.loads(path.read_text(encoding="utf-8")), "cached": True}
    if data.val is None or len(data.val) == 0:
        raise RecipeError(f"datasets[{spec.name}].target_modules: auto scores its trials on held-out rows; set "
                          "val_size > 0 or val_path")
    record = _select(model, spec, data, micro_batch_tokens, progress)
    record["cache_key"] = key
    atomic_write_json(path, record)
    return {**record, "cached": False}


def _select(model, spec: DatasetSpec, data: PreparedDataset, micro_batch_tokens: int | None, progress: bool) -> dict:
    started = time.perf_counter()
    auto, lora, layers = spec.auto, spec.lora, spec.lora.layers_to_transform
    budget = auto.budget or default_budget(model, lora.r, layers)
    sets = candidate_sets(model, auto.candidates, layers)
    ranks = {c.label: c.rank_for(budget) for c in sets}
    batches = _Batches(data.train, spec.train.batch_size, spec.train.seed)
    probe_rows = [row for b in range(auto.probe_batches) for row in _rows_of(batches, b)]
    probed = probe(model, probe_rows, spec.train.batch_size, micro_batch_tokens, max(ranks.values()))
    scores = {c.label: score(probed["energy"], c, ranks[c.label]) for c in sets}
    ranked = sorted(sets, key=lambda c: -scores[c.label])
    trialled = _trial_sets(ranked, references(model, layers), auto.trials)
    trials = [Trial(c, ranks[c.label], matched_alpha(lora.alpha, lora.r, ranks[c.label], lora.use_rslora))
              for c in trialled]
    budget_tokens = auto.cost * full_training_tokens(spec, data)
    val = data.val.select(range(min(auto.val_rows, len(data.val))))
    horizon, trial_seconds = 0, 0.0
    while len(trials) > 1:  # as many of the best sets as fit, each trial at least MIN_TRIAL_STEPS long
        horizon = _horizon(budget_tokens - PROBE_COST * probed["tokens"], len(trials), spec.train.batch_size,
                           _mean_length(data.train), _mean_length(val) * len(val))
        if horizon >= MIN_TRIAL_STEPS:
            break
        trials.pop()  # the least wanted: _trial_sets lists them in order of priority
    if len(trials) > 1:
        trial_started = time.perf_counter()
        trials = run_trials(model, spec, data.train, val, trials, horizon, micro_batch_tokens, progress)
        trial_seconds = time.perf_counter() - trial_started
    winner = trials[0].candidate if len(trials) > 1 else ranked[0]
    by_label = {tr.candidate.label: tr for tr in trials} if len(trials) > 1 else {}
    rows = []
    for c in ranked:
        tr = by_label.get(c.label)
        rows.append({"label": c.label, "modules": list(c.modules), "rank": ranks[c.label],
                     "alpha": matched_alpha(lora.alpha, lora.r, ranks[c.label], lora.use_rslora),
                     "params": tr.params if tr else ranks[c.label] * c.params_per_rank,
                     "probe_score": scores[c.label],
                     "trial": {"steps": tr.steps, "heldout": tr.heldout, "train_loss": tr.train_loss} if tr else None})
    rank = ranks[winner.label]
    return {
        "winner": winner.label, "target_modules": winner.target_modules(), "r": rank,
        "alpha": matched_alpha(lora.alpha, lora.r, rank, lora.use_rslora), "budget": budget,
        "decided_by": "trials" if by_label else "probe", "candidates": rows,
        "probe": {"batches": auto.probe_batches, "tokens": probed["tokens"], "seconds": probed["seconds"],
                  "energy": probed["energy"]},
        "trials": {"horizon": horizon, "batch_size": spec.train.batch_size,
                   "rounds": [list(r) for r in rounds(len(trials), horizon)] if by_label else [],
                   "seconds": trial_seconds},
        "seconds": time.perf_counter() - started, "budget_tokens": budget_tokens,
    }


def _rows_of(batches: _Batches, step: int) -> list:
    n = len(batches.order)
    return [batches.rows[batches.order[(step * batches.batch_size + j) % n]] for j in range(batches.batch_size)]


def _trial_sets(ranked: list, refs: list, count: int) -> list:
    """The probe's best `count` sets and the references, in order of priority: the probe's best, the references,
    then the probe's next ones (the probe's best alone when `count` is 0)."""
    if count == 0:
        return ranked[:1]
    chosen = []
    for c in [ranked[0], *refs, *ranked[1:count]]:
        if all(set(c.modules) != set(o.modules) for o in chosen):
            chosen.append(c)
    return chosen


def _mean_length(rows) -> float:
    lengths = [len(ids) for ids in rows["input_ids"]]
    return sum(lengths) / max(len(lengths), 1)


def _horizon(tokens: float, trials: int, batch_size: int, row_tokens: float, val_tokens: float) -> int:
    """The longest trial (in steps) whose successive halving, with its held-out passes, fits in `tokens`."""
    plan = rounds(trials, 1)
    evaluations = sum(alive for _, alive in plan)
    per_step = step_cost(trials) * batch_size * row_tokens
    steps = math.floor((tokens - EVAL_COST * evaluations * val_tokens) / per_step)
    return max(len(plan), steps)


def resolved_spec(spec: DatasetSpec, record: dict) -> DatasetSpec:
    """The dataset's settings with the chosen modules, and the rank and alpha that match the budget."""
    lora = spec.lora.model_copy(update={"r": record["r"], "alpha": record["alpha"]})
    return spec.model_copy(update={"target_modules": record["target_modules"], "lora": lora})
