"""Answer checkers a recipe names per dataset: what each accepts, the recipe's check of the name, and that naming
the default leaves the recipe's fingerprint as it was before the field existed."""
from __future__ import annotations

import pytest

from conftest import write_jsonl
from loraplex.checkers import ANSWER_CHECKERS, contains_answer, same_date, same_number, same_text
from loraplex.errors import RecipeError
from loraplex.recipe import load_recipe


def test_each_checker_accepts_its_kind_of_right_answer():
    assert same_text("Paris", " Paris\n") and not same_text("Paris", "paris")
    assert same_number("42", "The answer is 42.0.") and same_number("1,234", "= 1234")
    assert not same_number("42", "43 or 42") and not same_number("no number", "no number")
    assert same_date("2023-07-15", "It is 2023-07-15.") and not same_date("2023-07-15", "2023-07-16")
    assert same_date("2023-07-15", "2023-02-30, no: 2023-07-15")  # an impossible date is skipped
    assert not same_date("July 15", "July 15")  # no ISO date to compare
    assert contains_answer("blue", "The sky is blue.") and not contains_answer("", "anything")
    assert list(ANSWER_CHECKERS) == ["exact", "number", "iso-date", "contains"]


def recipe(tmp_path, **entry) -> dict:
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
    return {"model": {"path": "default"}, "datasets": [{"name": "a", "path": str(tmp_path / "a.jsonl"), **entry}]}


def test_the_recipe_names_a_checker_per_dataset(tmp_path):
    assert load_recipe(recipe(tmp_path)).datasets[0].checker == "exact"
    assert load_recipe(recipe(tmp_path, checker="iso-date")).datasets[0].checker == "iso-date"
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe(tmp_path, checker="numbers"))
    assert "datasets[a].checker" in str(err.value) and "'number'" in str(err.value) and "'numbers'" in str(err.value)


def test_the_default_checker_keeps_the_recipe_fingerprint(tmp_path):
    plain, named = load_recipe(recipe(tmp_path)), load_recipe(recipe(tmp_path, checker="exact"))
    assert plain.fingerprint() == named.fingerprint()
    assert load_recipe(recipe(tmp_path, checker="number")).fingerprint() != plain.fingerprint()
