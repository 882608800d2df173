"""Errors that reach the user as one friendly line each (the CLI prints them without a traceback)."""
from __future__ import annotations


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


class RecipeError(LoraplexError):
    """The recipe is invalid (all problems are reported at once)."""


class DataError(LoraplexError):
    """A dataset file or row is unusable."""


class ModelError(LoraplexError):
    """The base model cannot be found, converted or loaded."""
