"""What `loraplex train` does with each adapter, like a build tool: keep it, train it, or retrain it, and why.

An adapter's fingerprint covers exactly what decides its weights: the base (model path, dtype, quantization),
its tokenized rows (files, tokenizer, template, lengths, split), its target modules (with the `auto:` settings
when they are measured), its LoRA and training settings (seed included) and the weights of the adapters it is
composed with. Settings that change how it trains but not what (logging_steps, save_steps, micro_batch_tokens,
packed_attention, compile) are left out. The parts are kept in the adapter's loraplex.json, so a change is named.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.prepare import PreparedDataset
from ..device import dtype_name
from ..quantize import describe
from ..recipe import DatasetSpec, Recipe, compose_order
from ..run import adapter_dir, adapter_metadata, complete_adapters, is_complete, weights_hash

# how an adapter is trained, not what: a change of these keeps the adapter
HOW_NOT_WHAT = ("logging_steps", "save_steps", "micro_batch_tokens", "packed_attention", "compile")
DATA_OPTIONS = ("format", "columns", "system", "template", "max_seq_length", "max_samples", "val_size", "on_bad_rows")
SHOWN_CHANGES = 3

NEW, RETRAIN, KEEP, NOT_NAMED, NOT_IN_RECIPE, REMOVED = (
    "trained (new)", "retrained", "kept", "not named by `only`", "not in the recipe", "removed (prune=True)")


@dataclass
class Step:
    """One adapter's fate in a `train`: `action` is one of the names above, `reason` says why."""

    name: str
    action: str
    reason: str = ""

    @property
    def trains(self) -> bool:
        return self.action in (NEW, RETRAIN)

    def describe(self) -> str:
        return f"{self.action} ({self.reason})" if self.reason else self.action


def fingerprint_parts(spec: DatasetSpec, recipe: Recipe, data: PreparedDataset, composed: dict[str, str],
                      dtype: torch.dtype) -> dict:
    """Everything that decides the adapter's weights, by part. `composed`: name -> weights hash of compose_with;
    `dtype`: the workspace's (the recipe's `model.dtype` resolved)."""
    model = recipe.model
    local = recipe.resolve(model.path)
    train = spec.train.model_dump(mode="json")
    for key in HOW_NOT_WHAT:
        train.pop(key)
    return {
        "base": {"path": str(local.resolve()) if model.path != "default" and local.exists() else model.path,
                 "gguf_file": model.gguf_file, "dtype": dtype_name(dtype),
                 "quantization": describe(model, dtype) if model.quantization else None},
        "data": {"files": data.fingerprint, **{key: getattr(spec, key) for key in DATA_OPTIONS},
                 "rows_held_out_by_other_datasets": data.stats.get("held_out_elsewhere", 0), "rows": data.rows_key},
        "target_modules": spec.target_modules,
        "auto": spec.auto.model_dump(mode="json") if spec.target_modules == "auto" else None,
        "lora": spec.lora.fingerprint_dict(),  # variant fields only when set: older adapters keep their key
        "train": train,
        "compose_with": composed,
    }


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def what_changed(before: dict, after: dict) -> str:
    """The changed settings, e.g. 'train.lr 0.0002 -> 0.0001, lora.r 16 -> 8'."""
    old, new = _flat(before), _flat(after)
    changes = []
    for key in sorted(set(old) | set(new), key=_order):
        if old.get(key) == new.get(key):
            continue
        if key == "data.rows":  # the other data parts say more; this one alone means tokenizer or template
            if not any(k.startswith("data.") and k != key and old.get(k) != new.get(k) for k in set(old) | set(new)):
                changes.append("tokenized rows (the tokenizer or its chat template)")
        elif key == "data.files":
            changes.append("data files' contents")
        elif key.startswith("compose_with."):
            other = key.split(".", 1)[1]
            changes.append(f"now composed with {other}" if key not in old else f"no longer composed with {other}"
                           if key not in new else f"{other} (composed with) was retrained")
        else:
            changes.append(f"{key} {_show(old.get(key))} -> {_show(new.get(key))}")
    shown = changes[:SHOWN_CHANGES]
    more = len(changes) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _flat(parts: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in parts.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not value:
            continue
        if isinstance(value, dict) and key != "columns":
            flat.update(_flat(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _order(key: str) -> tuple:
    first = ("base", "data", "target_modules", "auto", "lora", "train", "compose_with")
    head = key.split(".")[0]
    return (first.index(head) if head in first else len(first), key)


def _show(value) -> str:
    return "unset" if value is None else json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value


def plan_run(recipe: Recipe, selected: list[str], prepared: dict[str, PreparedDataset], run_dir: Path,
             overwrite: bool, dtype: torch.dtype) -> list[Step]:
    """Each adapter's step, in training order (an adapter after those it is composed with), then the adapters of
    the run folder that the recipe no longer names."""
    steps: dict[str, Step] = {}
    for spec in compose_order(recipe.datasets):
        folder = adapter_dir(run_dir, spec.name)
        if spec.name not in selected:
            steps[spec.name] = Step(spec.name, NOT_NAMED, "" if is_complete(folder) else "not trained yet")
            continue
        retrained = [n for n in spec.compose_with if n in steps and steps[n].action == RETRAIN]
        steps[spec.name] = _step(spec, recipe, prepared[spec.name], folder, overwrite, retrained, dtype)
    names = {spec.name for spec in recipe.datasets}
    orphans = [Step(name, NOT_IN_RECIPE) for name in complete_adapters(run_dir) if name not in names]
    return list(steps.values()) + orphans


def _step(spec: DatasetSpec, recipe: Recipe, data: PreparedDataset, folder: Path, overwrite: bool,
          retrained: list[str], dtype: torch.dtype) -> Step:
    if not is_complete(folder):
        return Step(spec.name, NEW)
    if overwrite:
        return Step(spec.name, RETRAIN, "overwrite=True")
    if retrained:
        return Step(spec.name, RETRAIN, f"composed with {', '.join(retrained)}, which is retrained")
    recorded = adapter_metadata(folder).get("fingerprint_parts")
    if recorded is None:
        return Step(spec.name, RETRAIN, "no fingerprint recorded: trained by an earlier loraplex")
    composed = {name: weights_hash(adapter_dir(folder.parent.parent, name)) for name in spec.compose_with}
    parts = fingerprint_parts(spec, recipe, data, composed, dtype)
    return Step(spec.name, KEEP) if parts == recorded else Step(spec.name, RETRAIN, what_changed(recorded, parts))
