"""Stage 2 of `target_modules: auto`: short trainings of the best candidates at one parameter budget, with
successive halving on the selection rows (training rows the trials do not train on: `select.split`).

All trials share one copy of the base: each candidate is a named PEFT adapter on it, trained only while it is
the active one, with its own optimizer and learning-rate schedule (the recipe's, over the trial's length).
Every trial sees the same batches in the same order and is scored on the same rows. After each round the better
half (by loss on the selection rows) trains on; the last round's best wins. The adapters are unloaded at the end (never
merged), which leaves the base as it was.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..recipe import DatasetSpec
from ..targets import Candidate
from ..lm.packed import PackedCollator, answer_count, backward_answer_loss, heldout_metrics
from ..lm.dropout import use_lora_dropout
from ..lm.settings import lora_config
from .composed import composed_names


@dataclass
class Trial:
    candidate: Candidate
    rank: int
    alpha: float
    params: int = 0  # trainable parameters, counted on the model
    steps: int = 0
    selection_loss: list[float] = field(default_factory=list)  # loss on the selection rows after each round
    train_loss: list[float] = field(default_factory=list)  # per step


def rounds(trials: int, horizon: int) -> list[tuple[int, int]]:
    """Successive halving: (steps trained by the end of the round, trials training in it) per round; the last
    round ends at `horizon`, each earlier one at half the next."""
    count = max(1, math.ceil(math.log2(trials))) if trials > 1 else 1
    plan, alive = [], trials
    for r in range(count):
        plan.append((max(r + 1, round(horizon / 2 ** (count - 1 - r))), alive))
        alive = math.ceil(alive / 2)
    return plan


def step_cost(trials: int) -> float:
    """Trial steps run in all, per step of `horizon` (the successive-halving schedule's total)."""
    plan, done, total = rounds(trials, 2 ** 10), 0, 0
    for stop, alive in plan:
        total += alive * (stop - done)
        done = stop
    return total / 2 ** 10


def with_modules(spec: DatasetSpec, target_modules: list[str] | str, r: int, alpha: float) -> DatasetSpec:
    """The dataset's settings with other target modules, rank and alpha."""
    lora = spec.lora.model_copy(update={"r": r, "alpha": alpha})
    return spec.model_copy(update={"target_modules": target_modules, "lora": lora})


def trial_config(spec: DatasetSpec, trial: Trial):
    # plain LoRA: the trials compare module sets; the adapter then trains with the recipe's variant
    return lora_config(with_modules(spec, trial.candidate.target_modules(), trial.rank, trial.alpha), variant=False)


class Batches:
    """Step i's batch: rows of a seeded shuffle of the training split (cycling), the same for every trial."""

    def __init__(self, rows, batch_size: int, seed: int):
        self.rows, self.batch_size = rows, batch_size
        self.order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        self.cache: dict[int, dict] = {}

    def rows_of(self, step: int) -> list[dict]:
        n = len(self.order)
        return [self.rows[self.order[(step * self.batch_size + j) % n]] for j in range(self.batch_size)]

    def __call__(self, step: int) -> dict:
        if step not in self.cache:
            self.cache[step] = PackedCollator()(self.rows_of(step))
        return self.cache[step]


def run_trials(model, spec: DatasetSpec, train_rows, score_rows, trials: list[Trial], horizon: int,
               micro_batch_tokens: int | None, progress: bool = True, batch_size: int | None = None) -> list[Trial]:
    """Train `trials` by successive halving up to `horizon` steps of `batch_size` rows (default: the recipe's);
    returns them ordered best first. On a model with adapters loaded (`composed.composed_model`) they stay active
    and frozen beside each trial."""
    from transformers import get_scheduler

    t = spec.train
    names = [f"trial{i}" for i in range(len(trials))]
    composed = composed_names(model)  # a compose_with adapter's trials run with its composed adapters active
    peft_model = _with_trial_adapters(model, spec, trials, names)
    use_lora_dropout(peft_model)  # the trainer's dropout
    # "...lora_A.trial0.weight", and DoRA's "...lora_magnitude_vector.trial0" (no suffix)
    params = {name: [p for n, p in peft_model.named_parameters() if re.search(rf"\.{name}(\.|$)", n)]
              for name in names}
    optimizers, schedulers = {}, {}
    for name, trial in zip(names, trials):
        trial.params = sum(p.numel() for p in params[name])
        optimizers[name] = torch.optim.AdamW(params[name], lr=t.lr, weight_decay=t.weight_decay)
        schedulers[name] = get_scheduler(t.scheduler, optimizers[name], num_training_steps=horizon,
                                         num_warmup_steps=math.ceil(t.warmup_ratio * horizon))
    batches = Batches(train_rows, batch_size or t.batch_size, t.seed)
    plan = rounds(len(trials), horizon)
    alive = list(range(len(trials)))
    device = next(model.parameters()).device
    bar = tqdm(total=sum(a * (s - p) for (s, a), p in zip(plan, [0] + [s for s, _ in plan[:-1]])),
               desc=f"select {spec.name}", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for stop, _ in plan:
            for k in alive:
                name, trial = names[k], trials[k]
                _activate(peft_model, name, composed)
                peft_model.train()
                while trial.steps < stop:
                    torch.manual_seed(t.seed * 100_003 + trial.steps)  # the same dropout draws for every trial
                    trial.train_loss.append(_step(peft_model, batches(trial.steps), device, micro_batch_tokens,
                                                  params[name], optimizers[name], t.max_grad_norm))
                    schedulers[name].step()
                    trial.steps += 1
                    bar.update(1)
                trial.selection_loss.append(heldout_metrics(peft_model, score_rows)["loss"])
            alive = sorted(alive, key=lambda k: trials[k].selection_loss[-1])[:math.ceil(len(alive) / 2)]
    finally:
        bar.close()
        _remove_trial_adapters(peft_model, names, composed)
    return sorted(trials, key=lambda tr: (-tr.steps, tr.selection_loss[-1]))


def _with_trial_adapters(model, spec: DatasetSpec, trials: list[Trial], names: list[str]):
    """A PeftModel holding one adapter per trial (each initialised from the same seed) besides any already on it."""
    from peft import get_peft_model

    peft_model = model if composed_names(model) else None
    for name, trial in zip(names, trials):
        torch.manual_seed(spec.train.seed)
        if peft_model is None:
            peft_model = get_peft_model(model, trial_config(spec, trial), adapter_name=name)
        else:
            peft_model.add_adapter(name, trial_config(spec, trial))
    return peft_model


def _activate(peft_model, name: str, composed: list[str]) -> None:
    """Trial `name` in the forward with the composed adapters, and the only adapter with gradients."""
    if not composed:
        peft_model.set_adapter(name)
        return
    peft_model.base_model.set_adapter([name, *composed])  # makes every active adapter trainable...
    for param_name, param in peft_model.named_parameters():  # ...the composed ones stay frozen
        param.requires_grad_(bool(re.search(rf"\.{name}(\.|$)", param_name)))


def _remove_trial_adapters(peft_model, names: list[str], composed: list[str]) -> None:
    """Every trial's layers removed without merging them; composed adapters stay loaded and active."""
    if not composed:
        peft_model.unload()
        return
    peft_model.base_model.set_adapter(composed)
    for name in names:
        peft_model.delete_adapter(name)
    for param in peft_model.parameters():
        param.requires_grad_(False)


def _step(model, batch: dict, device, micro_batch_tokens: int | None, params, optimizer, max_grad_norm: float) -> float:
    """One optimizer step on the mean answer loss of `batch` (in passes of at most `micro_batch_tokens`)."""
    answers = answer_count(batch)
    total = backward_answer_loss(model, batch, answers, micro_batch_tokens, device)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / max(answers, 1)
