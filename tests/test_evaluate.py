"""The eval matrix on a tiny random Llama: shape, diagonal and base row equal to training's numbers,
generation metrics on test splits, task checkers, merged model rows, the `loraplex eval` command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from loraplex.demo.data import demo_checkers
from loraplex.evaluation import (GenerationSettings, chrf, evaluate_run, exact_match,
                               load_test_split)
from loraplex.records import EvalRecord, read_record

WORDS = ["apple", "river", "stone", "cloud", "amber", "pilot"]
FRUIT = ["苹果", "河流", "石头", "云朵", "琥珀", "飞行员"]
GENERATION = GenerationSettings(max_new_tokens=6, batch_size=4, max_examples=4, samples=2)


def make_run_recipe(tmp: Path, model_dir: Path) -> dict:
    """Three entries: `en` and `en_all` share one data file (q_proj vs all-linear); `zh` has its own."""
    en = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"} for w in WORDS * 6]
    zh = [{"instruction": f"重复：{w}", "input": "", "output": f"{w}{w}"} for w in FRUIT * 6]
    write_jsonl(tmp / "en.jsonl", en)
    write_jsonl(tmp / "zh.jsonl", zh)
    write_jsonl(tmp / "en_test.jsonl", en[:5])
    write_jsonl(tmp / "zh_test.jsonl", zh[:5])
    return {
        "model": {"path": str(model_dir), "dtype": "float32"}, "output_dir": str(tmp / "runs"), "run_name": "ev",
        "defaults": {"train": {"max_steps": 6, "lr": 3e-2, "batch_size": 8, "logging_steps": 1, "save_steps": 50},
                     "lora": {"r": 4, "alpha": 8}},
        "datasets": [
            {"name": "en", "path": str(tmp / "en.jsonl"), "test_path": str(tmp / "en_test.jsonl"),
             "target_modules": ["q_proj"]},
            {"name": "en_all", "path": str(tmp / "en.jsonl"), "target_modules": "all-linear"},
            {"name": "zh", "path": str(tmp / "zh.jsonl"), "test_path": str(tmp / "zh_test.jsonl"),
             "target_modules": ["v_proj"]},
        ],
    }



@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from loraplex import train

    tmp = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(tmp / "home"))
        return train(make_run_recipe(tmp, tiny_model_dir), progress=False).run_dir


@pytest.fixture(scope="module")
def matrix(run_dir) -> EvalRecord:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(run_dir.parent.parent / "home"))
        return evaluate_run(run_dir, generation=GENERATION)


def trained_meta(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "adapters" / name / "loraplex.json").read_text(encoding="utf-8"))


def test_matrix_shape(matrix):
    assert [r["name"] for r in matrix.rows] == ["base", "en", "en_all", "zh"]
    assert [r["kind"] for r in matrix.rows] == ["base", "adapter", "adapter", "adapter"]
    assert [c["name"] for c in matrix.columns] == ["en", "en_all", "zh"]
    assert set(matrix.metrics) == {"base", "en", "en_all", "zh"}
    for row in matrix.metrics.values():
        assert set(row) == {"en", "en_all", "zh"}
        for cell in row.values():
            assert cell["loss"] > 0 and cell["tokens"] > 0 and 0 <= cell["token_accuracy"] <= 1
            assert cell["perplexity"] == pytest.approx(2.718281828 ** cell["loss"], rel=1e-6)


def test_diagonal_and_base_row_equal_the_training_numbers(matrix, run_dir):
    for name in ("en", "en_all", "zh"):
        meta = trained_meta(run_dir, name)
        assert matrix.metrics[name][name]["loss"] == pytest.approx(meta["heldout_loss"], abs=1e-5)
        assert matrix.metrics["base"][name]["loss"] == pytest.approx(meta["heldout_loss_base"], abs=1e-5)
        assert matrix.metrics[name][name]["token_accuracy"] == pytest.approx(meta["heldout_token_accuracy"])
    # the adapters do differ from the base and from each other
    assert matrix.metrics["zh"]["zh"]["loss"] < matrix.metrics["base"]["zh"]["loss"]
    assert matrix.metrics["en"]["zh"]["loss"] != matrix.metrics["zh"]["zh"]["loss"]
    # the same data under two entries gives the same held-out numbers for every model
    for row in matrix.metrics.values():
        assert row["en"]["loss"] == row["en_all"]["loss"]


def test_generation_metrics_only_where_a_test_split_exists(matrix, run_dir):
    for row in matrix.metrics.values():
        assert row["en"]["test_examples"] == 4 and 0 <= row["en"]["exact_match"] <= 1 and 0 <= row["en"]["chrf"] <= 100
        assert row["zh"]["test_examples"] == 4
        assert "exact_match" not in row["en_all"]
    assert set(matrix.samples) == {"en", "zh"}
    sample = matrix.samples["zh"][0]
    assert sample["question"] == "重复：苹果" and sample["reference"] == "苹果苹果"
    assert set(sample["outputs"]) == {"base", "en", "en_all", "zh"}
    saved = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    assert saved["metrics"] == matrix.metrics and saved["schema"] == 1
    assert read_record(run_dir / "eval.json", EvalRecord).rows == matrix.rows  # evaluate returns the file's record
    assert not list(run_dir.glob(".eval.json.*"))  # written atomically, no leftovers


def test_exact_match_with_and_without_a_checker():
    assert exact_match([" a ", "b"], ["a", "c"]) == 0.5
    assert exact_match([], []) != exact_match([], [])  # nan
    rows = [{"n": 2}, {"n": 3}]
    is_double = lambda row, prediction: prediction.strip() == str(2 * row["n"])  # noqa: E731
    assert exact_match(["4", " 6\n"], rows, is_double) == 1.0
    assert exact_match(["4", "5"], rows, is_double) == 0.5


def test_chrf():
    assert chrf(["四千三百七十二"], ["四千三百七十二"]) == pytest.approx(100)
    assert 0 < chrf(["四千三百"], ["四千三百七十二"]) < 100
    assert chrf(["xyz"], ["四千"]) == 0


def test_demo_entries_get_the_demo_checker(tmp_path, monkeypatch):
    from loraplex.demo.data import expected_answer, write_demo_data
    from loraplex.demo.command import demo_recipe
    from loraplex.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    write_demo_data(tmp_path / "data", n_train=4, n_val=2, n_test=3)
    raw = demo_recipe()
    raw["datasets"].append({**raw["datasets"][0], "name": "custom", "test_path": "data/en/test.jsonl"})
    recipe = load_recipe(raw)
    checkers = demo_checkers(recipe)
    assert set(checkers) == {"zh", "en", "ja", "zh_all", "zh_auto"}  # 'custom' is not a demo entry: string equality
    row = {"instruction": "用中文写出这个数字：1005", "input": ""}
    assert checkers["zh"](row, f" {expected_answer('zh', row)}\n")
    assert not checkers["zh"](row, expected_answer("ja", row))


def test_test_split_reads_rows_prompts_and_references(run_dir, tiny_tokenizer):
    from loraplex.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.resolved.yaml")
    split = load_test_split(recipe.dataset("zh"), recipe, tiny_tokenizer, limit=3)
    assert len(split.prompts) == len(split.rows) == 3
    assert split.prompts[0].endswith("<|im_start|>assistant\n") and "重复：苹果" in split.prompts[0]
    assert split.references[0] == "苹果苹果" and split.rows[0]["output"] == "苹果苹果"


def test_eval_command_with_a_merged_model(run_dir, tmp_path):
    from peft import PeftModel

    from loraplex.cli import app
    from loraplex.models import load_model, load_tokenizer, resolve_base

    base = resolve_base(trained_meta(run_dir, "zh")["base_model_location"])
    merged_dir = tmp_path / "zh-merged"
    merged = PeftModel.from_pretrained(load_model(base), run_dir / "adapters" / "zh").merge_and_unload()
    merged.save_pretrained(merged_dir)
    load_tokenizer(base).save_pretrained(merged_dir)
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--merged", str(merged_dir), "--no-generate"])
    assert result.exit_code == 0, result.output
    assert "merged:zh-merged" in result.output and "en_all" in result.output
    saved = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    merged, adapter = saved["metrics"]["merged:zh-merged"], saved["metrics"]["zh"]
    for column in ("en", "zh"):
        assert merged[column]["loss"] == pytest.approx(adapter[column]["loss"], abs=1e-4)
        assert "exact_match" not in merged[column]


def test_eval_command_explains_a_folder_that_is_not_a_run(tmp_path):
    from loraplex.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a loraplex run" in " ".join(result.output.split())


def test_a_run_trained_from_a_recipe_file_with_relative_paths(tiny_model_dir, tmp_path, monkeypatch):
    """The usual layout: recipe.yaml beside data/, run folder under runs/; eval starts where train did."""
    import yaml

    from loraplex import train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "en.jsonl", [{"instruction": f"Say {w}.", "output": w} for w in WORDS * 3])
    recipe = {"model": {"path": str(tiny_model_dir), "dtype": "float32"},
              "defaults": {"train": {"max_steps": 1, "batch_size": 4}, "lora": {"r": 2, "alpha": 4}},
              "datasets": [{"name": "en", "path": "data/en.jsonl", "test_path": "data/en.jsonl"}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    run = train("recipe.yaml", progress=False).run_dir
    result = evaluate_run(Path("runs/recipe"), generation={"max_examples": 2, "max_new_tokens": 2})
    meta = trained_meta(run, "en")
    assert result.metrics["en"]["en"]["loss"] == pytest.approx(meta["heldout_loss"], abs=1e-5)
    assert result.metrics["base"]["en"]["test_examples"] == 2


def test_a_recipe_checker_judges_exact_match(run_dir, tmp_path, monkeypatch):
    """zh names `checker: contains` in a copy of the run: an answer holding the reference counts there, and only
    there (en keeps stripped string equality)."""
    import shutil

    import yaml

    copy = tmp_path / "ev"
    shutil.copytree(run_dir, copy)
    resolved = copy / "recipe.resolved.yaml"
    recipe = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    next(d for d in recipe["datasets"] if d["name"] == "zh")["checker"] = "contains"
    resolved.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    monkeypatch.setenv("LORAPLEX_HOME", str(run_dir.parent.parent / "home"))
    # every model answers the first test row with the reference inside a sentence, the second wrongly
    monkeypatch.setattr("loraplex.evaluation.greedy_answers", lambda model, tokenizer, jobs, *args: [
        ("答：苹果苹果。", "river")[i % 2] for i in range(len(jobs))])  # each test split's two prompts in turn
    result = evaluate_run(copy, generation=GenerationSettings(max_examples=2, cross=True))
    columns = {c["name"]: c["exact_match"] for c in result.columns}
    assert columns == {"en": "stripped string equality", "en_all": "stripped string equality",
                       "zh": "expected answer contained"}
    for cells in result.metrics.values():
        assert cells["zh"]["exact_match"] == 0.5 and cells["en"]["exact_match"] == 0.0


def test_the_run_records_carry_their_schema(matrix, run_dir):
    """run.json, loraplex.json and eval.json are written through loraplex.records: `schema` first."""
    for path in (run_dir / "run.json", run_dir / "adapters" / "en" / "loraplex.json", run_dir / "eval.json"):
        written = json.loads(path.read_text(encoding="utf-8"))
        assert next(iter(written)) == "schema" and written["schema"] == 1, path
