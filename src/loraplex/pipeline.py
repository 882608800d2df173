"""The steps every command starts with: load the recipe, resolve the base, check modules, prepare data."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .data.prepare import PreparedDataset, prepare_all
from .device import pick_dtype
from .data.render import template_problems
from .models import BaseModelRef, load_tokenizer, meta_model, resolve_base
from .errors import RecipeError, unknown_name_message
from .recipe import Recipe, load_recipe
from .targets import check_recipe_modules
from .timing import phase


@dataclass
class Workspace:
    """A validated recipe with its resolved base model, tokenizer and dtype (`model.dtype`, `auto` resolved here
    once: everything downstream takes this torch.dtype)."""

    recipe: Recipe
    base: BaseModelRef
    tokenizer: object
    dtype: torch.dtype
    only: list[str] | None = None

    def selected(self) -> list:
        return [d for d in self.recipe.datasets if not self.only or d.name in self.only]

    def prepare(self) -> dict[str, PreparedDataset]:
        with phase("prepare"):
            return prepare_all(self.recipe, self.tokenizer, self.only)


def open_recipe(source: str | Path | dict | Recipe, overrides: list[str] | None = None,
                only: list[str] | None = None) -> Workspace:
    recipe = source if isinstance(source, Recipe) else load_recipe(source, overrides)
    names = [d.name for d in recipe.datasets]
    unknown = [unknown_name_message("dataset", n, names) for n in only or [] if n not in names]
    if unknown:
        raise RecipeError([f"only: {u}" for u in unknown])
    model = recipe.model
    base = resolve_base(model.path, model.gguf_file, recipe.base_dir, model.trust_remote_code)
    tokenizer = load_tokenizer(base, model.trust_remote_code)
    problems = template_problems(recipe.datasets, tokenizer, base.name)
    if problems:
        raise RecipeError(problems, title="recipe does not fit the tokenizer")
    check_recipe_modules(recipe, meta_model(base, model.trust_remote_code))
    return Workspace(recipe, base, tokenizer, pick_dtype(model.dtype), list(only) if only else None)


@dataclass(frozen=True)
class DatasetStats:
    """One dataset as `loraplex.prepare` tokenized it (lengths in tokens, train and val rows together)."""

    name: str
    format: str  # alpaca, messages, sharegpt
    rows: int  # read from its files
    bad_rows: int  # left out, each named in the log
    train: int
    val: int
    held_out_elsewhere: int  # rows another dataset of the recipe holds out of the same file
    truncated: int  # kept, cut at max_seq_length
    dropped: int  # their answer would not fit
    length_p50: int
    length_p90: int
    length_p99: int
    length_max: int
    max_seq_length: int
    recommended_max_seq_length: int  # covers 99% of the rows, a multiple of 64
    answer_tokens: int  # the tokens the loss is computed on
    total_tokens: int

    @classmethod
    def from_cache(cls, stats: dict) -> DatasetStats:
        """From the statistics a prepared dataset's cache holds (a count an older cache lacks reads as 0)."""
        return cls(**{f.name: stats.get(f.name, 0) for f in fields(cls)})


def prepare_recipe(source: str | Path | dict | Recipe, overrides: list[str] | None = None,
                   only: list[str] | None = None) -> list[DatasetStats]:
    """`loraplex prepare`: statistics per dataset (tokenized data is cached for training)."""
    workspace = open_recipe(source, overrides, only)
    return [DatasetStats.from_cache(p.stats) for p in workspace.prepare().values()]
