"""Dotted `key=value` overrides of a recipe (`datasets.zh.lora.r=32`, `defaults.train.lr=1e-4`), applied to the raw
YAML before validation; `datasets.<name>` selects an entry by name."""
from __future__ import annotations

from typing import Any

import yaml

from .errors import RecipeError, unknown_name_message


def apply_override(raw: dict, item: str) -> None:
    """Apply one `dotted.key=value` override in place; `datasets.<name>` selects an entry by name."""
    if "=" not in item:
        raise RecipeError(f"override '{item}' has no '='; write it as key=value, e.g. datasets.zh.lora.r=32")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
        if isinstance(value, dict) and not text.lstrip().startswith("{"):
            value = text  # `system=Answer: briefly` is a string with a colon, not a mapping
    except yaml.YAMLError:
        raise RecipeError(f"override '{item}': the value is not valid YAML; check its brackets and quotes") from None
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"override '{item}' has an empty key")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _find_entry(node, part, item)
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"override '{item}': '{'.'.join(parts[:i])}' is not a mapping")
        if part not in node or node[part] is None:
            node[part] = [] if part == "datasets" else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        raise RecipeError(f"override '{item}': name a field inside the dataset, e.g. datasets.{last}.lora.r=32")
    if not isinstance(node, dict):
        raise RecipeError(f"override '{item}': '{'.'.join(parts[:-1])}' is not a mapping")
    node[last] = value


def _find_entry(entries: list, name: str, item: str) -> dict:
    names = [e.get("name") for e in entries if isinstance(e, dict)]
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    if name.isdecimal() and int(name) < len(entries):
        return entries[int(name)]
    raise RecipeError(f"override '{item}': " + unknown_name_message("dataset", name, [n for n in names if n]))
