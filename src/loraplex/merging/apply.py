"""The merge itself: a fresh float32 base with the adapters loaded side by side (the reference), and the merged
weights W' = W + Σ wᵢ·ΔWᵢ written into a second fresh load (DoRA modules through PEFT)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..adapters import attach
from ..data.render import chat_template_for
from ..device import to_accelerator
from ..errors import ParameterError
from ..models import load_model
from ..run import check_base
from .plan import PEFT_METHODS, MergePlan

COMBINED = "loraplex_combined"  # name of PEFT's combined adapter for linear/ties/dare_linear


def reference_model(plan: MergePlan, seed: int = 0):
    """A fresh float32 base (fingerprint checked) with every adapter loaded side by side by PEFT."""
    model = load_model(plan.base, torch.float32)
    folders = {name: a.adapter_dir for name, a in plan.adapters.items()}
    check_base(model, plan.base, folders)  # each adapter in its own training dtype
    peft_model = attach(model, folders)
    if plan.method in PEFT_METHODS:
        _add_combined(peft_model, plan, seed)
    return to_accelerator(peft_model).eval()


def _add_combined(peft_model, plan: MergePlan, seed: int) -> None:
    names = list(plan.adapters)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dare_linear drops values at random
        try:
            peft_model.add_weighted_adapter(names, [plan.weights[n] for n in names], COMBINED,
                                            combination_type=plan.method,
                                            density=None if plan.method == "linear" else plan.density)
        except ValueError as exc:
            raise ParameterError("method", f"'{plan.method}': PEFT refused these adapters ({exc}); "
                                 "method='sum' merges them exactly") from None
    # PEFT gives the combined adapter r = lora_alpha but keeps the first adapter's use_rslora, which would
    # scale it by √r; its A and B already carry each wᵢ·scalingᵢ, so its scaling is 1.
    for layer in lora_layers(peft_model):
        if COMBINED in layer.scaling:
            layer.scaling[COMBINED] = 1.0


def lora_layers(peft_model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


def lora_layer(reference, name: str):
    return reference.get_base_model().get_submodule(name)


def expected_delta(plan: MergePlan, reference, name: str) -> torch.Tensor:
    """What W' − W must be on a plain LoRA module: the exact weighted sum, or PEFT's combined adapter."""
    if plan.method in PEFT_METHODS:
        return lora_layer(reference, name).get_delta_weight(COMBINED).float()
    return sum(plan.weights[a] * plan.adapters[a].modules[name].delta() for a in plan.owners[name])


def merged_tokenizer(plan: MergePlan):
    """The base's tokenizer with the chat template the adapters were trained with."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.base.location)
    names = {a.meta.get("config", {}).get("template") for a in plan.adapters.values()}
    templates = {chat_template_for(tokenizer, n) for n in names}
    note = None
    if len(templates) > 1:
        note = (f"the adapters were trained with different chat templates ({', '.join(sorted(map(str, names)))}); "
                "the merged tokenizer keeps the base's")
        templates = {chat_template_for(tokenizer)}
    tokenizer.chat_template = templates.pop()
    return tokenizer, tokenizer.chat_template, note


def write_merged(plan: MergePlan, reference, tokenizer, folder: Path) -> None:
    """A second fresh base load gets every change (DoRA through PEFT), then is saved with the tokenizer."""
    model = _merge_dora(load_model(plan.base, torch.float32), plan)
    with torch.no_grad():
        for name in plan.owners:
            if plan.dora_owner(name) is None:
                weight = model.get_submodule(name).weight
                weight += expected_delta(plan, reference, name).to(weight.device)
    model.to(plan.dtype).save_pretrained(folder)  # with config.json and generation_config.json
    tokenizer.save_pretrained(folder)


def _merge_dora(model, plan: MergePlan):
    dora = [n for n, a in plan.adapters.items() if a.use_dora]
    if not dora:
        return model
    return attach(model, {n: plan.adapters[n].adapter_dir for n in dora}).merge_and_unload(adapter_names=dora)
