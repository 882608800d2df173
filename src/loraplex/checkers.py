"""Answer checkers a recipe names per dataset (`checker:`): is a generated answer right, given the expected one?

Each takes (expected answer, generated answer) and is used for exact match on the dataset's test split; a caller
of `evaluate_run` may pass its own checkers instead (the demo's recompute the answer from the prompt)."""
from __future__ import annotations

import datetime as dt
import re
from typing import Callable

ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")  # 1,234.5: commas group thousands


def same_text(reference: str, prediction: str) -> bool:
    """Equal strings once surrounding whitespace is stripped."""
    return prediction.strip() == reference.strip()


def first_number(text: str) -> float | None:
    match = NUMBER.search(text)
    return float(match.group().replace(",", "")) if match else None


def same_number(reference: str, prediction: str) -> bool:
    """The first number in each is the same ("42", "The answer is 42.0" and "= 42" agree)."""
    expected = first_number(reference)
    return expected is not None and first_number(prediction) == expected


def first_date(text: str) -> dt.date | None:
    for match in ISO_DATE.finditer(text):
        try:
            return dt.date(*map(int, match.groups()))
        except ValueError:  # 2023-02-30 is no date
            continue
    return None


def same_date(reference: str, prediction: str) -> bool:
    """The first valid ISO date (YYYY-MM-DD) in each is the same."""
    expected = first_date(reference)
    return expected is not None and first_date(prediction) == expected


def contains_answer(reference: str, prediction: str) -> bool:
    """The expected answer, stripped, appears in the generated one."""
    return bool(reference.strip()) and reference.strip() in prediction


# recipe name -> (checker, how eval.json and the report describe it)
ANSWER_CHECKERS: dict[str, tuple[Callable[[str, str], bool], str]] = {
    "exact": (same_text, "stripped string equality"),
    "number": (same_number, "same first number"),
    "iso-date": (same_date, "same first ISO date"),
    "contains": (contains_answer, "expected answer contained"),
}
CHECKER_NAMES = tuple(ANSWER_CHECKERS)
