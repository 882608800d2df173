"""Verification of a merged model: its weights against the formula, its logits against base+adapters, and how much
of each adapter's held-out loss improvement it keeps."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..device import dtype_name
from ..errors import LoraplexError
from ..inspect_adapter import AdapterWeights
from ..models import base_state_items
from ..run import open_run, read_recipe
from ..lm.packed import heldout_metrics
from .apply import COMBINED, lora_layer, lora_layers, expected_delta
from .plan import PEFT_METHODS, MergePlan

WEIGHT_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # of max(max|W|, max|expected W'|)
LOGIT_RTOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}  # max|Δlogits| / max(1, max|logits|)
KEEP_THRESHOLD = 0.9  # share of an adapter's held-out loss improvement the merged model should keep
PROBE_TEXTS = ("Hello! Who are you?", "What is 17 + 25?", "用一句话介绍长城。",
               "「ありがとう」を英語に訳してください。", "Write one sentence about rivers.")


def verify(plan: MergePlan, reference, merged, probes: list[torch.Tensor], folder: Path) -> dict:
    weights = check_weights(plan, reference, merged)
    logits = check_logits(plan, reference, merged, probes)
    keys = _saved_keys(folder)
    nested = [k for k in keys if "base_model.model" in k or "lora_" in k]
    failures = []
    failed = [name for name, entry in weights["modules"].items() if not entry["passed"]]
    if failed:
        entry = weights["modules"][failed[0]]
        failures.append(f"weights: {failed[0]} is off by {entry['max_abs_diff']:.3e} ({entry['relative']:.3e} of "
                        f"max|W|; tolerance {weights['tolerance_relative']:g}) and {len(failed) - 1} more modules")
    if weights["untouched_max_abs_diff"] != 0.0 or weights["missing_or_extra"]:
        failures.append(f"weights no adapter touches changed (max {weights['untouched_max_abs_diff']:.3e}) or "
                        f"differ in name ({', '.join(weights['missing_or_extra'][:3])})")
    if logits["max_abs_diff"] > logits["tolerance"]:
        failures.append(f"logits: max |merged − base+adapters| = {logits['max_abs_diff']:.3e} > tolerance "
                        f"{logits['tolerance']:.3e}")
    if nested:
        failures.append(f"saved keys still carry PEFT names, e.g. {nested[0]}")
    if failures:
        raise LoraplexError(failures + ["this is a bug: please report it with these numbers"],
                            title="the merged model failed verification (nothing was written)")
    return {
        "run_dir": str(plan.run_dir), "method": plan.method, "method_requested": plan.requested, "exact": plan.exact,
        "dtype": dtype_name(plan.dtype), "base_model": plan.base.name, "base_model_location": plan.base.location,
        "adapters": [_adapter_entry(name, a, plan.weights[name]) for name, a in plan.adapters.items()],
        "shared_modules": plan.shared_modules(), "verification": {"weights": weights, "logits": logits},
    }


def _adapter_entry(name: str, adapter: AdapterWeights, weight: float) -> dict:
    cfg = adapter.config
    return {"name": name, "adapter_dir": str(adapter.adapter_dir), "weight": weight, "r": cfg["r"],
            "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("use_rslora")), "use_dora": adapter.use_dora,
            "scaling": adapter.scaling, "scaling_formula": adapter.scaling_formula(),
            "target_modules": adapter.target_modules, "modules": len(adapter.modules)}


@torch.no_grad()
def check_weights(plan: MergePlan, reference, merged) -> dict:
    """Per merged module max|W' − expected| (and relative to max|W|); every other weight must be unchanged."""
    modules = {}
    for name, owners in plan.owners.items():
        W = lora_layer(reference, name).get_base_layer().weight.double()  # pristine: the reference never merges
        exact = W + sum(plan.weights[a] * plan.adapters[a].modules[name].delta(torch.float64).to(W.device)
                        for a in owners)  # recomputed in float64, independently of the merge's float32 sum
        dora = plan.dora_owner(name)
        if dora:
            expected = plan.adapters[dora].modules[name].merged_weight(W, torch.float64)
        elif plan.method in PEFT_METHODS:
            expected = W + expected_delta(plan, reference, name).double()
        else:
            expected = exact
        got = merged.get_submodule(name).weight.double()
        scale = float(W.abs().max()) or 1.0
        entry = {"adapters": owners, "max_abs_diff": float((got - expected).abs().max()), "max_abs_W": scale,
                 "max_abs_expected": float(expected.abs().max())}
        entry["relative"] = entry["max_abs_diff"] / scale
        # a saved bfloat16/float16 weight is rounded relative to its own size, which ΔW may have grown
        entry["passed"] = entry["max_abs_diff"] <= WEIGHT_RTOL[plan.dtype] * max(scale, entry["max_abs_expected"])
        if plan.method in PEFT_METHODS:
            entry["exact_sum_relative_deviation"] = float((got - exact).abs().max()) / scale
        modules[name] = entry
    untouched, odd = _untouched(plan, reference, merged)
    return {"reference": _weights_reference(plan), "tolerance_relative": WEIGHT_RTOL[plan.dtype],
            "max_abs_diff": max(e["max_abs_diff"] for e in modules.values()),
            "max_relative": max(e["relative"] for e in modules.values()),
            "untouched_max_abs_diff": untouched, "missing_or_extra": odd, "modules": modules}


def _weights_reference(plan: MergePlan) -> str:
    if plan.method in PEFT_METHODS:
        return f"W + PEFT's {plan.method} combined adapter (not the exact sum; see exact_sum_relative_deviation)"
    dora = " (DoRA modules: m·(W + ΔW)/‖W + ΔW‖)" if any(a.use_dora for a in plan.adapters.values()) else ""
    return "W + Σ wᵢ·scalingᵢ·Bᵢ@Aᵢ computed from adapter_model.safetensors" + dora


def _untouched(plan: MergePlan, reference, merged) -> tuple[float, list[str]]:
    touched = {f"{name}.weight" for name in plan.owners}
    pristine = dict(base_state_items(reference))
    saved = merged.state_dict()
    odd = sorted(set(pristine) ^ set(saved))
    worst = 0.0
    for name, tensor in saved.items():
        if name in touched or name not in pristine or not tensor.numel():
            continue
        expected = pristine[name].to(plan.dtype).float()  # the saved dtype's rounding, nothing more
        worst = max(worst, float((tensor.float() - expected.to(tensor.device)).abs().max()))
    return worst, odd


def _saved_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            keys += list(fh.keys())
    return keys


@contextlib.contextmanager
def all_adapters_active(reference, plan: MergePlan):
    """Base+adapters as the merge promises it: every adapter active at its weight, or PEFT's combined one."""
    names = [COMBINED] if plan.method in PEFT_METHODS else list(plan.adapters)
    reference.base_model.set_adapter(names if len(names) > 1 else names[0], inference_mode=True)
    layers = lora_layers(reference)
    try:
        for layer in layers:
            for name in names:
                if name != COMBINED:
                    layer.set_scale(name, plan.weights[name])
        yield reference
    finally:
        for layer in layers:
            for name in names:
                if name != COMBINED:
                    layer.set_scale(name, 1.0)


@torch.no_grad()
def check_logits(plan: MergePlan, reference, merged, probes: list[torch.Tensor]) -> dict:
    """Max |logits(merged) − logits(base+adapters)| over a few short chat prompts."""
    device = next(merged.parameters()).device
    with all_adapters_active(reference, plan):
        expected = [reference(input_ids=ids.to(device)).logits.float() for ids in probes]
    got = [merged(input_ids=ids.to(device)).logits.float() for ids in probes]
    diff = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    scale = max(1.0, max(float(e.abs().max()) for e in expected))
    reference_name = (f"PEFT's {plan.method} combined adapter (not the exact sum)" if plan.method in PEFT_METHODS
                      else "PEFT base+adapters, all active at once, each at its weight")
    return {"reference": reference_name, "prompts": len(probes), "tokens": sum(ids.numel() for ids in probes),
            "max_abs_diff": diff, "max_abs_logit": scale, "tolerance": LOGIT_RTOL[plan.dtype] * scale}


def probe_ids(tokenizer, template: str) -> list[torch.Tensor]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], chat_template=template, tokenize=False,
                                           add_generation_prompt=True) for t in PROBE_TEXTS]
    return [tokenizer(t, add_special_tokens=False, return_tensors="pt").input_ids for t in texts]


# --------------------------------------------------------------------------- held-out loss


@torch.no_grad()
def heldout_report(plan: MergePlan, reference, merged, splits: dict | None = None) -> dict:
    """Held-out loss of base, adapter and merged model on each adapter's own held-out split (or `splits`)."""
    try:
        splits = splits if splits is not None else heldout_splits(plan)
    except LoraplexError as exc:
        return {"threshold": KEEP_THRESHOLD, "skipped": exc.render(), "datasets": {}}
    rows: dict[str, dict] = {}
    for name, split in splits.items():
        if isinstance(split, str):
            rows[name] = {"skipped": split}
            continue
        base, adapter = base_and_adapter_loss(reference, name, split)
        merged_loss = heldout_metrics(merged, split)["loss"]
        gain = base - adapter
        kept = (base - merged_loss) / gain if gain > 0 else None
        rows[name] = {"base": base, "adapter": adapter, "merged": merged_loss, "kept": kept, "rows": len(split),
                      "below_threshold": kept is not None and kept < KEEP_THRESHOLD}
    return {"threshold": KEEP_THRESHOLD, "datasets": rows}


@torch.no_grad()
def base_and_adapter_loss(reference, name: str, rows) -> tuple[float, float]:
    """Held-out loss of `rows` under the base alone and under adapter `name` alone (of the reference's adapters)."""
    with reference.disable_adapter():
        base = heldout_metrics(reference, rows)["loss"]
    reference.base_model.set_adapter(name, inference_mode=True)
    return base, heldout_metrics(reference, rows)["loss"]


def heldout_splits(plan: MergePlan) -> dict:
    """name -> the held-out split training used (from the run's resolved recipe), or why there is none."""
    in_recipe = {d.get("name") for d in read_recipe(plan.run_dir).get("datasets") or []}
    names = [n for n in plan.adapters if n in in_recipe]
    prepared = open_run(plan.run_dir, only=names).prepare() if names else {}
    splits: dict = {n: "not a dataset of the run's recipe" for n in plan.adapters if n not in in_recipe}
    for name in names:
        data, recorded = prepared[name], plan.adapters[name].meta.get("dataset_fingerprint")
        if recorded and recorded != data.fingerprint:
            splits[name] = f"the data files changed since training (fingerprint {recorded} -> {data.fingerprint})"
        elif data.val is None or not len(data.val):
            splits[name] = "the dataset has no held-out split (val_size 0 and no val_path)"
        else:
            splits[name] = data.val
    return splits
