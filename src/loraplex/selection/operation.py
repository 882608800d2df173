"""`loraplex select`: the `target_modules: auto` decision for each dataset of a recipe, without training."""
from __future__ import annotations

from pathlib import Path

from ..errors import LoraplexError
from ..lm.base import load_base
from ..lm.settings import micro_batch_tokens
from ..models import base_fingerprint
from ..pipeline import open_recipe
from ..recipe import Recipe
from ..records import SelectionRecord
from .choose import choose_modules
from .composed import composed_folders


def select(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None, only: list[str] | None = None,
           progress: bool = True, allow_pickle: bool = False) -> dict[str, SelectionRecord]:
    """`loraplex select`: the `target_modules: auto` decision for each selected dataset (name -> its record, as the
    selection cache holds it), without training it.

    Datasets whose recipe names their modules are measured too (with their `auto` settings)."""
    ws = open_recipe(recipe, overrides, only)
    prepared = ws.prepare()
    model, base_record = load_base(ws, allow_pickle)
    pristine = base_record.get("quantized_base_fingerprint", base_record["base_fingerprint"])
    decisions = {}
    for spec in ws.selected():
        composed = composed_folders(spec, ws.recipe.run_dir())  # decided in the model the adapter trains in
        decision = choose_modules(model, spec, prepared[spec.name], pristine, micro_batch_tokens(spec), progress,
                                  composed)
        decisions[spec.name] = SelectionRecord.model_validate({**decision,
                                                               "recipe_target_modules": spec.target_modules})
        after = base_fingerprint(model, ws.dtype)
        if after != pristine:
            raise LoraplexError(f"the base weights changed while selecting modules for '{spec.name}' (fingerprint "
                                f"{pristine} -> {after}). This is a bug: please report it")
    return decisions
