"""What LoRA can target in a model: its linear modules, the checks of a recipe's `target_modules`, and the
module sets `target_modules: auto` chooses between, each with the rank that gives it a parameter budget."""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from torch import nn

from .errors import RecipeError

ALL_LINEAR = "all-linear"
GROUPS = {"attention": ("attn", "attention"), "mlp": ("mlp", "ffn", "feed_forward")}  # group -> parent name parts
REFERENCES = ("q_proj+v_proj", ALL_LINEAR)  # always trialled (the LoRA paper's choice, QLoRA's choice)


def output_layer_names(model: nn.Module) -> set[str]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if out is not None and module is out}


def linear_modules(model: nn.Module, layers: list[int] | None = None) -> dict[str, nn.Module]:
    """Full name -> module for every linear layer LoRA can target (the LM head excluded), only those of `layers`
    when given. Where PEFT wrapped a layer, its name maps to the wrapped base layer (listed after the wrapper)."""
    skip = output_layer_names(model)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not _is_linear(module) or name in skip or "lora_" in name:
            continue
        name = name.removesuffix(".base_layer")
        index = layer_index(name)
        if layers is None or index is None or index in layers:
            found[name] = module
    return found


def layer_index(name: str) -> int | None:
    """The decoder layer a module's full name is in ("model.layers.3.mlp.up_proj" -> 3), or None."""
    index = re.search(r"\.(\d+)\.", f".{name}.")
    return int(index.group(1)) if index else None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def linear_leaf_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for full in linear_modules(model):
        leaf = full.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    return names


def num_layers(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "num_hidden_layers", None)


def check_target_modules(model: nn.Module, target_modules: list[str] | str, r: int,
                         layers_to_transform: list[int] | None, where: str) -> list[str]:
    """One line per problem: unknown/non-linear module names, r too large, layer indices out of range."""
    arch = type(model).__name__
    linear = linear_modules(model)
    leaves = linear_leaf_names(model)
    problems: list[str] = []
    names = leaves if target_modules in ("all-linear", "auto") else list(target_modules)
    all_leaves = {full.rsplit(".", 1)[-1]: m for full, m in model.named_modules() if full}
    for name in names:
        if name in leaves:
            continue
        if name in {full.rsplit(".", 1)[-1] for full in output_layer_names(model)}:
            problems.append(f"{where}.target_modules: '{name}' is the output layer of {arch}, which loraplex "
                            f"does not adapt; LoRA targets: {', '.join(leaves)}")
            continue
        if name in all_leaves:
            kind = type(all_leaves[name]).__name__
            problems.append(f"{where}.target_modules: '{name}' is a {kind} in {arch}, not a linear layer; "
                            f"LoRA targets linear layers: {', '.join(leaves)}")
            continue
        close = difflib.get_close_matches(name, leaves, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        problems.append(f"{where}.target_modules: '{name}' is not a linear module of {arch}; {hint}"
                        f"available: {', '.join(leaves)}")
    for name in names:
        dims = [min(m.in_features, m.out_features) for full, m in linear.items()
                if full.rsplit(".", 1)[-1] == name and hasattr(m, "in_features")]
        if dims and r > min(dims):
            problems.append(f"{where}.lora.r: r={r} is larger than {name}'s smallest dimension ({min(dims)}); "
                            f"use r <= {min(dims)}")
    n_layers = num_layers(model)
    if layers_to_transform and n_layers is not None:
        bad = [i for i in layers_to_transform if not 0 <= i < n_layers]
        if bad:
            problems.append(f"{where}.lora.layers_to_transform: {bad} out of range; {arch} has layers "
                            f"0..{n_layers - 1}")
    return problems


def check_recipe_modules(recipe, model: nn.Module) -> None:
    """Every dataset's target modules, r and layers against the real model; RecipeError lists all."""
    problems: list[str] = []
    for spec in recipe.datasets:
        where = f"datasets[{spec.name}]"
        if spec.target_modules == "auto":  # each candidate gets its own rank: only the names and layers are checked
            problems += candidate_problems(model, spec.auto.candidates, where)
            problems += check_target_modules(model, "auto", 1, spec.lora.layers_to_transform, where)
            continue
        problems += check_target_modules(model, spec.target_modules, spec.lora.r, spec.lora.layers_to_transform,
                                         where)
    if problems:
        raise RecipeError(problems, title="recipe does not fit the base model")


# --------------------------------------------------------------------------- candidates for `target_modules: auto`


@dataclass(frozen=True)
class Candidate:
    """A set of module names and what one rank of LoRA on all of them costs."""

    label: str  # "q_proj", "q_proj+v_proj", "attention", "mlp" or "all-linear"
    modules: tuple[str, ...]  # leaf names
    params_per_rank: int  # sum of (in + out) over every adapted module of every layer
    max_rank: int  # the smallest min(in, out) among them

    def rank_for(self, budget: int) -> int:
        """The rank whose parameter count is nearest the budget (at least 1, at most max_rank)."""
        return max(1, min(self.max_rank, round(budget / self.params_per_rank)))

    def budget_miss(self, budget: int) -> str | None:
        """Why this set cannot have `budget` parameters within half a rank step (None when it can): a set whose
        one rank costs more than twice the budget, or whose largest rank costs less, would be compared at
        another budget than the others."""
        rank = self.rank_for(budget)
        params = rank * self.params_per_rank
        if abs(params - budget) <= self.params_per_rank / 2:
            return None
        bound = "least" if rank == 1 else "most"
        return (f"rank {rank}, the {bound} it can have, gives {params:,} parameters: {params / budget:.2f}x the "
                f"budget of {budget:,}")

    def target_modules(self) -> list[str] | str:
        return ALL_LINEAR if self.label == ALL_LINEAR else list(self.modules)


def module_shapes(model: nn.Module, layers: list[int] | None = None) -> dict[str, list[tuple[int, int]]]:
    """Leaf name -> (in, out) of each of its linear modules (only in `layers` when given)."""
    shapes: dict[str, list[tuple[int, int]]] = {}
    for full, module in linear_modules(model, layers).items():
        shapes.setdefault(full.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))
    return shapes


def module_groups(model: nn.Module) -> dict[str, list[str]]:
    """'attention' / 'mlp' -> the leaf names under the layers' attention / MLP blocks."""
    groups: dict[str, list[str]] = {}
    for full in linear_modules(model):
        parts = full.split(".")
        parent, leaf = (parts[-2] if len(parts) > 1 else ""), parts[-1]
        for group, markers in GROUPS.items():
            if any(m in parent.lower() for m in markers) and leaf not in groups.get(group, []):
                groups.setdefault(group, []).append(leaf)
    return groups


def make_candidate(label: str, modules: list[str], shapes: dict[str, list[tuple[int, int]]]) -> Candidate:
    dims = [d for m in modules for d in shapes[m]]
    return Candidate(label, tuple(modules), sum(i + o for i, o in dims), min(min(i, o) for i, o in dims))


def _resolve_entry(entry: str | list[str], leaves: list[str], groups: dict[str, list[str]]) -> tuple[str, list[str]]:
    """A candidate as written in a recipe -> (label, leaf names); unknown names are returned as they are."""
    if isinstance(entry, str) and entry == ALL_LINEAR:
        return ALL_LINEAR, list(leaves)
    if isinstance(entry, str) and entry in groups:
        return entry, groups[entry]
    names = entry.split("+") if isinstance(entry, str) else list(entry)
    names = [n.strip() for n in names if n.strip()]
    return "+".join(names), names


def candidates(model: nn.Module, entries: list | None = None, layers: list[int] | None = None) -> list[Candidate]:
    """The recipe's candidates, or by default: each linear module alone, attention, mlp, q_proj+v_proj,
    all-linear (each set once, under its first label)."""
    leaves = linear_leaf_names(model)
    groups = module_groups(model)
    if entries is None:
        entries = list(leaves) + list(groups) + [r for r in REFERENCES
                                                 if r == ALL_LINEAR or set(r.split("+")) <= set(leaves)]
    shapes = module_shapes(model, layers)
    out: dict[frozenset, Candidate] = {}
    for entry in entries:
        label, names = _resolve_entry(entry, leaves, groups)
        out.setdefault(frozenset(names), make_candidate(label, names, shapes))
    return list(out.values())


def matched_candidates(sets: list[Candidate], budget: int) -> tuple[list[Candidate], dict[str, str]]:
    """(the sets that can meet `budget` within half a rank step, label -> why each other one cannot)."""
    misses = {c.label: c.budget_miss(budget) for c in sets}
    return [c for c in sets if misses[c.label] is None], {label: why for label, why in misses.items() if why}


def references(model: nn.Module, layers: list[int] | None = None) -> list[Candidate]:
    """q_proj+v_proj (where the model has them) and all-linear: the sets every selection trains in its trials."""
    leaves = set(linear_leaf_names(model))
    return candidates(model, [r for r in REFERENCES if r == ALL_LINEAR or set(r.split("+")) <= leaves], layers)


def candidate_problems(model: nn.Module, entries: list | None, where: str) -> list[str]:
    """One line per unknown module name or empty entry in `auto.candidates`."""
    if entries is None:
        return []
    if not entries:
        return [f"{where}.auto.candidates: empty; list module sets, or leave it out for the default sets"]
    leaves, groups = linear_leaf_names(model), module_groups(model)
    problems = []
    for entry in entries:
        label, names = _resolve_entry(entry, leaves, groups)
        if not names:
            problems.append(f"{where}.auto.candidates: an empty set ({entry!r}); name at least one module")
        for name in names:
            if name not in leaves:
                close = difflib.get_close_matches(name, leaves + list(groups), n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'? " if close else ""
                problems.append(f"{where}.auto.candidates: '{name}' is not a linear module of "
                                f"{type(model).__name__}; {hint}use {', '.join(leaves)}, "
                                f"{', '.join(list(groups) + [ALL_LINEAR])}, or a list of modules")
    return problems


def default_budget(model: nn.Module, r: int, layers: list[int] | None = None) -> int:
    """The trainable parameters of rank `r` on q_proj and v_proj (PEFT's default for Llama); on a model without
    them, on all linear modules."""
    leaves = linear_leaf_names(model)
    names = ["q_proj", "v_proj"] if {"q_proj", "v_proj"} <= set(leaves) else leaves
    return r * make_candidate("+".join(names), names, module_shapes(model, layers)).params_per_rank


def matched_alpha(alpha: float, r: int, rank: int, rslora: bool) -> float:
    """lora_alpha for `rank` keeping the scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) of the recipe."""
    return alpha * (math.sqrt(rank / r) if rslora else rank / r)
