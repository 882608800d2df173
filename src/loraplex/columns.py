"""A dataset's column roles, and the names LLaMA-Factory (dataset_info.json `columns`) and Axolotl (`field_*`) give
them, so a `columns:` mapping written for either tool works as it is."""
from __future__ import annotations

COLUMN_ROLES = ("instruction", "input", "output", "system", "history", "messages")
COLUMN_ALIASES = {"prompt": "instruction", "query": "input", "response": "output", "conversations": "messages",
                  "field_instruction": "instruction", "field_input": "input", "field_output": "output",
                  "field_system": "system", "field_history": "history", "field_messages": "messages"}


def canonical_columns(columns: dict[str, str]) -> dict[str, str]:
    """role (or another tool's name for it) -> column, as role -> column; ValueError names what is wrong."""
    unknown = sorted(set(columns) - set(COLUMN_ROLES) - set(COLUMN_ALIASES))
    if unknown:
        raise ValueError(f"unknown column role(s) {unknown}; roles are {', '.join(COLUMN_ROLES)} (or their "
                         f"LLaMA-Factory / Axolotl names {', '.join(COLUMN_ALIASES)})")
    roles = {COLUMN_ALIASES.get(role, role): column for role, column in columns.items()}
    if len(roles) < len(columns):
        raise ValueError(f"two names of one role in {columns}; keep one")
    return roles
