"""The `loraplex` CLI: init, prepare (table and JSON), friendly errors without tracebacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import SHARED_DATA, write_json, write_jsonl
from loraplex.cli import app
from loraplex.errors import RecipeError

runner = CliRunner()


def flat(text: str) -> str:
    """Rich wraps long lines at the console width; compare with whitespace collapsed."""
    return " ".join(text.split())


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir) -> Path:
    write_json(tmp_path / "zh.json", [{"instruction": f"问题 {i}", "input": "", "output": f"答案 {i}"}
                                      for i in range(10)])
    write_jsonl(tmp_path / "en.jsonl", [{"messages": [{"role": "user", "content": f"question {i}"},
                                                      {"role": "assistant", "content": f"answer {i}"}]}
                                        for i in range(6)])
    return write_recipe(tmp_path / "tiny.yaml", {
        "model": {"path": str(tiny_model_dir)},
        "defaults": {"max_seq_length": 128, "val_size": 0.1},
        "datasets": [{"name": "zh", "path": "zh.json", "target_modules": ["q_proj"]},
                     {"name": "en", "path": "en.jsonl", "target_modules": ["v_proj"]}],
    })


# --------------------------------------------------------------------------- init


def test_init_writes_the_example_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "recipe.yaml"
    result = runner.invoke(app, ["init", str(path)])
    assert result.exit_code == 0, result.output
    example = resources.files("loraplex").joinpath("recipes/example.yaml").read_text(encoding="utf-8")
    assert path.read_text(encoding="utf-8") == example
    assert f"loraplex prepare {path}" in flat(result.output)

    path.write_text("mine\n", encoding="utf-8")
    result = runner.invoke(app, ["init", str(path)])
    assert result.exit_code == 2
    assert f"error: {path} exists; pass --force to overwrite it" in flat(result.output)
    assert path.read_text(encoding="utf-8") == "mine\n"

    result = runner.invoke(app, ["init", str(path), "--force"])
    assert result.exit_code == 0, result.output
    assert path.read_text(encoding="utf-8") == example


# --------------------------------------------------------------------------- prepare


def test_prepare_json(tiny_recipe):
    result = runner.invoke(app, ["prepare", str(tiny_recipe), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert [s["name"] for s in stats] == ["zh", "en"]
    zh, en = stats
    # rows are held out by a hash of their content: about val_size (0.1) of them, at least one
    assert (zh["format"], zh["rows"], zh["train"] + zh["val"], zh["bad_rows"]) == ("alpaca", 10, 10, 0)
    assert (en["format"], en["rows"], en["train"] + en["val"], en["bad_rows"]) == ("messages", 6, 6, 0)
    assert 1 <= zh["val"] <= 3 and 1 <= en["val"] <= 3
    assert zh["max_seq_length"] == 128 and zh["recommended_max_seq_length"] == 64


def test_prepare_only_and_overrides(tiny_recipe):
    result = runner.invoke(app, ["prepare", str(tiny_recipe), "datasets.en.val_size=0.5", "--only", "en", "--json"])
    assert result.exit_code == 0, result.output
    (en,) = json.loads(result.stdout)
    assert (en["name"], en["train"] + en["val"]) == ("en", 6) and en["val"] >= 2  # more than at val_size 0.1

    result = runner.invoke(app, ["prepare", str(tiny_recipe), "--only", "fr"])
    assert result.exit_code == 2
    assert "--only: unknown dataset 'fr'; known: zh, en" in flat(result.output)


def test_prepare_table_names_the_datasets(tiny_recipe):
    result = runner.invoke(app, ["prepare", str(tiny_recipe)])
    assert result.exit_code == 0, result.output
    assert "zh" in result.stdout and "en" in result.stdout
    assert "alpaca" in result.stdout and "messages" in result.stdout
    stats = json.loads(runner.invoke(app, ["prepare", str(tiny_recipe), "--json"]).stdout)
    assert "10 (0)" in result.stdout
    assert all(f"{s['train']}/{s['val']}" in result.stdout for s in stats)


def test_target_module_typo_is_a_friendly_error(tiny_recipe):
    result = runner.invoke(app, ["prepare", str(tiny_recipe), "datasets.zh.target_modules=[qproj]"])
    assert result.exit_code == 2
    text = flat(result.output)
    assert "error: recipe does not fit the base model:" in text
    # the dataset name in brackets survives the console's markup
    assert "datasets[zh].target_modules: 'qproj' is not a linear module of LlamaForCausalLM; " \
           "did you mean 'q_proj'?" in text


# --------------------------------------------------------------------------- errors


def _invalid_recipe(tmp_path) -> Path:
    write_json(tmp_path / "zh.json", [{"instruction": "q", "output": "a"}])
    return write_recipe(tmp_path / "bad.yaml", {"datasets": [
        {"name": "zh", "path": "zh.json", "lora": {"r": 0}, "train": {"lrr": 1}},
        {"name": "en", "path": "missing.json"}]})


def test_invalid_recipe_exits_2_with_every_problem(tmp_path):
    result = runner.invoke(app, ["prepare", str(_invalid_recipe(tmp_path))])
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = flat(result.output)
    assert text.startswith("error: recipe is invalid:")
    assert "- datasets[zh].lora.r: input should be greater than 0 (got 0)" in text
    assert "- datasets[zh].train.lrr: unknown key 'lrr'; did you mean 'lr'?" in text
    assert f"- datasets[en].path: file {tmp_path / 'missing.json'} does not exist" in text
    assert "Traceback" not in result.output


def test_debug_env_lets_the_exception_through(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_DEBUG", "1")
    result = runner.invoke(app, ["prepare", str(_invalid_recipe(tmp_path))])
    assert isinstance(result.exception, RecipeError)
    assert any("datasets[zh].lora.r" in p for p in result.exception.problems)


def test_real_process_prints_no_traceback(tmp_path):
    path = _invalid_recipe(tmp_path)
    script = "from loraplex.cli import app; app(prog_name='loraplex')"
    env = {**os.environ, "COLUMNS": "400"}
    env.pop("LORAPLEX_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", script, "prepare", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "error: recipe is invalid:" in proc.stderr
    assert "  - datasets[zh].lora.r: input should be greater than 0 (got 0)\n" in proc.stderr
    assert proc.stdout == ""


def test_missing_recipe_file(tmp_path):
    result = runner.invoke(app, ["prepare", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert f"error: recipe file {tmp_path / 'nope.yaml'} does not exist; `loraplex init" in flat(result.output)


# --------------------------------------------------------------------------- the real demo data


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_zh_demo.json").is_file(), reason="../shared/data is absent")
def test_prepare_shared_alpaca_zh_demo(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path / "zh.yaml", {
        "model": {"path": str(tiny_model_dir)},
        "datasets": [{"name": "zh", "path": str(SHARED_DATA / "alpaca_zh_demo.json"), "max_seq_length": 2048}]})
    result = runner.invoke(app, ["prepare", str(path), "--json"])
    assert result.exit_code == 0, result.output
    (zh,) = json.loads(result.stdout)
    assert (zh["rows"], zh["bad_rows"], zh["format"]) == (1000, 0, "alpaca")
    assert zh["train"] + zh["val"] + zh["dropped"] == 1000 and 80 <= zh["val"] <= 120  # val_size 0.1, by content hash


def test_bad_rows_are_printed_verbatim(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "a", "history": "x"}\n'
                    '{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    path = write_recipe(tmp_path / "r.yaml", {"model": {"path": str(tiny_model_dir)},
                                              "datasets": [{"name": "d", "path": "d.jsonl"}]})
    result = runner.invoke(app, ["prepare", str(path)])
    assert result.exit_code == 2
    text = flat(result.output)
    assert "error: the data cannot be prepared:" in text
    assert "- dataset 'd': 1 bad row(s) of 3" in text
    assert f"- {data} line 2: field 'history' must be a list of [user, assistant] string pairs, got 'x'" in text
    assert "set on_bad_rows: skip for dataset 'd'" in text


def test_demo_data_refuses_to_replace_files(tmp_path):
    first = runner.invoke(app, ["demo-data", str(tmp_path / "d")])
    assert first.exit_code == 0, first.output
    mine = tmp_path / "d" / "en" / "train.jsonl"
    mine.write_text("my edits\n", encoding="utf-8")
    again = runner.invoke(app, ["demo-data", str(tmp_path / "d"), "--seed", "1"])
    assert again.exit_code == 2 and "pass --force to replace them" in flat(again.output)
    assert mine.read_text(encoding="utf-8") == "my edits\n"
    assert runner.invoke(app, ["demo-data", str(tmp_path / "d"), "--force"]).exit_code == 0
    assert mine.read_text(encoding="utf-8") != "my edits\n"


def test_library_messages_in_the_cli_words():
    """Library errors name parameters as Python does; the CLI says the same with its flags."""
    from loraplex.cli import cli_words

    assert cli_words("adapters: name one, e.g. adapters=['zh', 'en']") == "--adapters: name one, e.g. --adapters zh,en"
    assert cli_words("out_dir: /x holds a merge; pass overwrite=True") == "--out: /x holds a merge; pass --overwrite"
    assert cli_words("weights: method='weights-search' picks them; leave weights=None") == \
        "--weights: --method weights-search picks them; leave --weights out"
    assert cli_words("2 problems:\n  - only: unknown dataset 'fr'") == "2 problems:\n  - --only: unknown dataset 'fr'"
    assert cli_words("datasets[a].lora.r: must be a whole number") == "datasets[a].lora.r: must be a whole number"
    assert cli_words("out: /x exists; choose another file, or pass force=True to replace it") == \
        "--out: /x exists; choose another file, or pass --force to replace it"
    assert cli_words("b: not named by `only`; train it first (or leave only=None)") == \
        "b: not named by --only; train it first (or leave --only out)"
    assert cli_words("export the merged folder (merged=<folder>)") == "export the merged folder (--merged <folder>)"
    assert cli_words("a layout=x with max_rows=3") == "a layout=x with max_rows=3"  # only whole parameter names
