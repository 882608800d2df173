"""`target_modules: auto`: probe every candidate module set, trial the best few, keep the winner.

Every candidate gets one parameter budget (a set that cannot meet it within half a rank step is left out, with
the reason); the probe and the trials read training rows only (`split`), so the held-out split grades the choice.
The decision is cached under `$LORAPLEX_HOME/selections/` by everything it depends on (the base's fingerprint,
the tokenized rows' cache key, the composed adapters' weights, the `auto` settings, the LoRA and training
settings): the same question is answered once.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from ..data.prepare import PreparedDataset
from ..device import loraplex_home
from ..recipe import DatasetSpec
from ..records import SelectionRecord, read_record, write_record
from ..errors import RecipeError
from ..targets import candidates as candidate_sets, default_budget, matched_alpha, matched_candidates, references
from .composed import composed_model, weights_hashes
from .probe import probe, score
from .split import SelectionSplit, selection_split
from .trials import Batches, Trial, rounds, run_trials, step_cost, with_modules

VERSION = 4  # part of the cache key: a change to the method invalidates old decisions
PROBE_COST = 1.5  # a probe pass (forward, backward, weight gradients) against a LoRA training step, per token
EVAL_COST = 1 / 3  # a forward pass against a training step, per token
MIN_TRIAL_STEPS = 8  # a shorter trial ranks the sets by their first steps' noise: the probe decides alone


def cache_key(spec: DatasetSpec, data: PreparedDataset, base_fingerprint: str, micro_batch_tokens: int | None,
              composed: dict[str, str] | None = None) -> str:
    settings = {"v": VERSION, "base": base_fingerprint, "rows": data.rows_key, "auto": spec.auto.model_dump(),
                "composed": composed or {},
                "lora": spec.lora.model_dump(), "micro": micro_batch_tokens,
                "train": spec.train.model_dump(exclude={"logging_steps", "save_steps"})}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def full_training_tokens(spec: DatasetSpec, data: PreparedDataset) -> int:
    """Tokens the dataset's full training will run (epochs or max_steps)."""
    t = spec.train
    if t.max_steps:
        return round(t.max_steps * t.batch_size * t.grad_accum * _mean_length(data.train))
    return round(sum(data.train["length"]) * t.epochs)


def choose_modules(model, spec: DatasetSpec, data: PreparedDataset, base_fingerprint: str,
                   micro_batch_tokens: int | None, progress: bool = True,
                   composed: dict[str, Path] | None = None) -> dict:
    """The decision record for `spec` (from the cache when the same question was answered before).

    `composed`: name -> folder of the adapters `spec` is composed with; the decision is made with them loaded,
    active and frozen, in the model the adapter will train in."""
    hashes = weights_hashes(composed or {})
    key = cache_key(spec, data, base_fingerprint, micro_batch_tokens, hashes)
    path = loraplex_home() / "selections" / f"{key}.json"
    if path.is_file():
        return {**read_record(path, SelectionRecord).as_dict(), "cached": True}
    with composed_model(model, composed or {}) as in_training:
        record = _select(in_training, spec, data, micro_batch_tokens, progress)
    record.update(cache_key=key, composed_with=hashes)
    write_record(path, SelectionRecord.model_validate(record))
    return {**record, "cached": False}


def _select(model, spec: DatasetSpec, data: PreparedDataset, micro_batch_tokens: int | None, progress: bool) -> dict:
    started = time.perf_counter()
    auto, lora, layers = spec.auto, spec.lora, spec.lora.layers_to_transform
    budget = auto.budget or default_budget(model, lora.r, layers)
    sets, dropped = matched_candidates(candidate_sets(model, auto.candidates, layers), budget)
    if not sets:
        raise RecipeError([f"datasets[{spec.name}].auto: no candidate can have the budget of {budget:,} parameters "
                           "within half a rank step"] + [f"{label}: {why}" for label, why in dropped.items()]
                          + ["set auto.budget (or lora.r) to a budget the candidates can meet"])
    ranks = {c.label: c.rank_for(budget) for c in sets}
    alphas = {label: matched_alpha(lora.alpha, lora.r, rank, lora.use_rslora) for label, rank in ranks.items()}
    split, no_trials = _split(spec, data)
    batches = Batches(split.fit, spec.train.batch_size, spec.train.seed)
    probe_rows = [row for step in range(auto.probe_batches) for row in batches.rows_of(step)]
    probed = probe(model, probe_rows, spec.train.batch_size, micro_batch_tokens, layers)
    scores = {c.label: score(probed["row_norms"], c, ranks[c.label]) for c in sets}
    ranked = sorted(sets, key=lambda c: -scores[c.label])
    refs = [c for c in references(model, layers) if c.label not in dropped]
    trials = [Trial(c, ranks[c.label], alphas[c.label]) for c in _trial_sets(ranked, refs, auto.trials, scores)]
    budget_tokens = auto.cost * full_training_tokens(spec, data)
    left = budget_tokens - PROBE_COST * probed["tokens"]
    trial_started = time.perf_counter()
    trials, (horizon, trial_batch), skipped = _run_trials_that_fit(model, spec, split, trials, left,
                                                                   micro_batch_tokens, progress, no_trials)
    trial_seconds = time.perf_counter() - trial_started
    winner = trials[0].candidate if horizon else ranked[0]
    by_label = {tr.candidate.label: tr for tr in trials} if horizon else {}
    rows = [{"label": c.label, "modules": list(c.modules), "rank": ranks[c.label], "alpha": alphas[c.label],
             "params": by_label[c.label].params if c.label in by_label else ranks[c.label] * c.params_per_rank,
             "probe_score": scores[c.label], "trial": _trial_record(by_label.get(c.label))} for c in ranked]
    return {
        "winner": winner.label, "target_modules": winner.target_modules(), "r": ranks[winner.label],
        "alpha": alphas[winner.label], "budget": budget, "candidates": rows,
        "dropped": [{"label": label, "reason": why} for label, why in dropped.items()],
        "decided_by": "trials" if horizon else f"probe ({skipped})",
        "probe": {"batches": auto.probe_batches, "tokens": probed["tokens"], "seconds": probed["seconds"],
                  "row_norms": probed["row_norms"]},
        "trials": {"horizon": horizon, "batch_size": trial_batch, "seconds": trial_seconds if horizon else 0.0,
                   "rounds": [list(r) for r in rounds(len(trials), horizon)] if horizon else []},
        "seconds": time.perf_counter() - started, "budget_tokens": budget_tokens,
        "rows": _rows_record(split, len(probe_rows), horizon),
    }


def _split(spec: DatasetSpec, data: PreparedDataset) -> tuple[SelectionSplit, str]:
    """The training rows the selection fits and scores on, and why no trial can run ("" when they can)."""
    rows = spec.auto.selection_rows
    if not spec.auto.trials:
        return SelectionSplit(data.train, None), "auto.trials is 0"
    split = selection_split(data.train, rows, spec.train.batch_size)
    if split is None:
        return SelectionSplit(data.train, None), (f"{len(data.train)} training rows: too few to score trials on "
                                                  f"auto.selection_rows = {rows} and train them on a batch of others")
    return split, ""


def _rows_record(split: SelectionSplit, probe_rows: int, horizon: int) -> dict:
    """Which rows each of the decision's figures comes from (the held-out split: none of them)."""
    scored = len(split.score) if split.score is not None and horizon else 0
    return {"fit": len(split.fit), "probe": probe_rows, "trials_scored_on": scored, "heldout_read": 0,
            "note": f"probe and trials train on {len(split.fit)} training rows; trials are scored on "
                    f"{scored} other training rows (auto.selection_rows, chosen by a hash of their token ids); "
                    "the held-out split is not read"}


def _run_trials_that_fit(model, spec: DatasetSpec, split: SelectionSplit, trials: list[Trial], tokens: float,
                         micro_batch_tokens: int | None, progress: bool,
                         no_trials: str) -> tuple[list[Trial], tuple[int, int], str]:
    """The most wanted of `trials` (in order of priority) that fit in `tokens` with at least MIN_TRIAL_STEPS each,
    run (none when `no_trials` says why): on the recipe's batch size if they fit, else on smaller batches (halved
    down to one row) before fewer sets: a noisier trial of the sets the probe cannot tell apart says more than none.

    Returns (the trials that ran, best first; (their length in steps, rows per step): (0, 0) when none ran; why
    none ran: "" when they did)."""
    if no_trials or len(trials) < 2:
        return trials, (0, 0), no_trials or "fewer than two sets to trial"
    plan = _trial_plan(tokens, len(trials), spec.train.batch_size, _mean_length(split.fit), sum(split.score["length"]))
    if plan is None:
        return trials, (0, 0), (f"no two trials of {MIN_TRIAL_STEPS} steps fit in auto.cost = {spec.auto.cost:g} of "
                                "the full training, even on batches of one row")
    count, batch, horizon = plan
    ran = run_trials(model, spec, split.fit, split.score, trials[:count], horizon, micro_batch_tokens, progress,
                     batch_size=batch)
    return ran, (horizon, batch), ""


def _trial_plan(tokens: float, trials: int, batch_size: int, row_tokens: float,
                score_tokens: float) -> tuple[int, int, int] | None:
    """(how many trials, rows per step, steps) of the largest batch, then the most trials, that fit in `tokens`
    with at least MIN_TRIAL_STEPS each; None when not even two fit on batches of one row."""
    batch = batch_size
    while batch >= 1:
        for count in range(trials, 1, -1):
            horizon = _horizon(tokens, count, batch, row_tokens, score_tokens)
            if horizon >= MIN_TRIAL_STEPS:
                return count, batch, horizon
        batch = batch // 2
    return None


def trial_losses(trial: dict) -> list[float]:
    """A trial record's loss after each round (records written before the selection split named them "heldout")."""
    return trial.get("selection_loss", trial.get("heldout", []))


def _trial_record(trial: Trial | None) -> dict | None:
    if trial is None:
        return None
    return {"steps": trial.steps, "selection_loss": trial.selection_loss, "train_loss": trial.train_loss}


def _trial_sets(ranked: list, refs: list, count: int, scores: dict[str, float]) -> list:
    """The sets the trials train, in order of priority: the probe's best; the probe's best set of several modules;
    the references; the probe's next ones (up to `count` of them). The probe's best alone when `count` is 0.

    The probe measures the first step, where one module at a high rank gains most; a budget spread over many
    modules at a low rank may learn more over a whole training, which only a trial shows. A set the probe scores 0
    is left out: its LoRA's gradient is 0 (B starts at 0 and A's gradient goes through B), so it cannot learn."""
    if count == 0:
        return ranked[:1]
    spread = [c for c in ranked if len(c.modules) > 1][:1]
    chosen = []
    for c in [ranked[0], *spread, *refs, *ranked[1:count]]:
        if scores.get(c.label, 0.0) > 0 and all(set(c.modules) != set(o.modules) for o in chosen):
            chosen.append(c)
    return chosen or ranked[:1]


def _mean_length(rows) -> float:
    return sum(rows["length"]) / max(len(rows), 1)


def _horizon(tokens: float, trials: int, batch_size: int, row_tokens: float, score_tokens: float) -> int:
    """The longest trial (in steps) whose successive halving, with its scoring passes, fits in `tokens`."""
    plan = rounds(trials, 1)
    evaluations = sum(alive for _, alive in plan)
    per_step = step_cost(trials) * batch_size * row_tokens
    steps = math.floor((tokens - EVAL_COST * evaluations * score_tokens) / per_step)
    return max(len(plan), steps)


def resolved_spec(spec: DatasetSpec, record: dict) -> DatasetSpec:
    """The dataset's settings with the chosen modules, and the rank and alpha that match the budget."""
    return with_modules(spec, record["target_modules"], record["r"], record["alpha"])
