"""Errors that reach the user as one friendly line each (the CLI prints them without a traceback)."""
from __future__ import annotations

import difflib


class LoraplexError(Exception):
    """A user-facing error. `problems` holds one line per problem, each with its fix."""

    def __init__(self, problems: str | list[str], *, title: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1 and not self.title:
            return self.problems[0]
        head = self.title or f"{len(self.problems)} problems"
        return head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)


class ParameterError(LoraplexError):
    """An argument of a library function is unusable; the message starts with the parameter's name and speaks of
    other parameters as Python does (`overwrite=True`): the CLI says the same with its flags."""

    def __init__(self, param: str, problem: str):
        self.param, self.problem = param, problem
        super().__init__(f"{param}: {problem}")


class RecipeError(LoraplexError):
    """The recipe is invalid (all problems are reported at once)."""


class DataError(LoraplexError):
    """A dataset file or row is unusable."""


class ModelError(LoraplexError):
    """The base model cannot be found, converted or loaded."""


def friendly_validation_message(err: dict) -> str:
    """A pydantic error as what to write instead."""
    msg = err["msg"]
    if err["type"] == "missing":
        return "required; add it"
    if err["type"] == "string_pattern_mismatch":
        return "use letters, digits, '_', '.' or '-' (starting with a letter or digit)"
    if err["type"] in _TYPE_FIXES:
        return _TYPE_FIXES[err["type"]]
    return msg[0].lower() + msg[1:] if msg else msg


# pydantic's wording names the type; these say what to write instead
_TYPE_FIXES = {
    "int_parsing": "must be a whole number, e.g. 16 (no quotes)", "int_type": "must be a whole number, e.g. 16",
    "int_from_float": "must be a whole number, e.g. 16 (no decimal part)",
    "float_parsing": "must be a number, e.g. 3 or 2.0e-4 (no quotes)",
    "float_type": "must be a number, e.g. 3 or 2.0e-4",
    "finite_number": "must be a finite number, not .inf or .nan",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "string_type": "must be text; quote it if YAML reads it as something else",
    "list_type": "must be a list, e.g. [q_proj, v_proj]",
    "dict_type": "must be a mapping (key: value lines)", "model_type": "must be a mapping (key: value lines)",
    "invalid_key": "keys must be text; quote the key",
}


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5 if len(name) <= 3 else 0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown {kind} '{name}'; {hint}known: {', '.join(known) if known else '(none)'}"
