"""Recipe loading: defaults merge, dotted overrides, all-errors-at-once, YAML errors, shipped recipes."""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest
import yaml

from conftest import SHARED_DATA, write_json
from loraplex.errors import RecipeError
from loraplex.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
ROW = [{"instruction": "say hi", "input": "", "output": "hi"}]


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_json(tmp_path / "zh.json", ROW)


def write_recipe(path: Path, raw: dict | str) -> Path:
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def problems_of(source, overrides=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(source, overrides)
    return info.value.problems


def has_line(problems: list[str], *parts: str) -> bool:
    return any(all(p in line for p in parts) for line in problems)


# --------------------------------------------------------------------------- defaults and overrides


def test_defaults_merge_key_by_key_and_dataset_values_win(data_file):
    recipe = load_recipe({
        "defaults": {"max_seq_length": 256, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                     "train": {"lr": 1e-3, "epochs": 2}, "target_modules": ["k_proj"]},
        "datasets": [
            {"name": "zh", "path": str(data_file), "lora": {"r": 32}, "train": {"epochs": 5}},
            {"name": "en", "path": str(data_file), "max_seq_length": 64, "target_modules": "all-linear"},
        ],
    })
    zh, en = recipe.dataset("zh"), recipe.dataset("en")
    # nested blocks merged key by key: the dataset's r wins, alpha/dropout come from defaults
    assert (zh.lora.r, zh.lora.alpha, zh.lora.dropout) == (32, 8, 0.0)
    assert (zh.train.epochs, zh.train.lr) == (5, 1e-3)
    assert zh.max_seq_length == 256 and zh.target_modules == ["k_proj"]
    assert (en.lora.r, en.lora.alpha) == (4, 8)
    assert en.max_seq_length == 64 and en.target_modules == "all-linear"
    # values neither block sets keep the schema default
    assert zh.train.batch_size == 8 and zh.val_size == 0.1


def test_dotted_overrides(data_file):
    raw = {"defaults": {"lora": {"r": 4, "alpha": 8}},
           "datasets": [{"name": "zh", "path": str(data_file)}, {"name": "en", "path": str(data_file)}]}
    recipe = load_recipe(raw, ["datasets.zh.lora.r=32", "defaults.train.lr=1e-4", "model.dtype=float32"])
    assert recipe.dataset("zh").lora.r == 32
    assert recipe.dataset("zh").lora.alpha == 8  # merged with defaults, not replaced
    assert recipe.dataset("en").lora.r == 4
    assert recipe.dataset("zh").train.lr == pytest.approx(1e-4)
    assert recipe.dataset("en").train.lr == pytest.approx(1e-4)
    assert recipe.model.dtype == "float32"
    assert raw["defaults"] == {"lora": {"r": 4, "alpha": 8}}  # the caller's dict is not modified


def test_override_with_unknown_dataset_suggests_the_name(data_file):
    problems = problems_of({"datasets": [{"name": "zh", "path": str(data_file)}]}, ["datasets.zhh.lora.r=32"])
    assert problems == ["override 'datasets.zhh.lora.r=32': unknown dataset 'zhh'; did you mean 'zh'? known: zh"]


def test_override_without_equals_sign(data_file):
    problems = problems_of({"datasets": [{"name": "zh", "path": str(data_file)}]}, ["datasets.zh.lora.r"])
    assert has_line(problems, "override 'datasets.zh.lora.r' has no '='", "key=value")


@pytest.mark.parametrize("override, expected", [
    ("defaults.lora.r.x.y=1", "override 'defaults.lora.r.x.y=1': 'defaults.lora.r' is not a mapping"),
    ("model.path.x.y=1", "override 'model.path.x.y=1': 'model.path' is not a mapping"),
    ("datasets.zh.target_modules=[q_proj",
     "override 'datasets.zh.target_modules=[q_proj': the value is not valid YAML; check its brackets and quotes"),
])
def test_malformed_overrides_are_recipe_errors(data_file, override, expected):
    raw = {"model": {"path": "default"}, "defaults": {"lora": {"r": 4}},
           "datasets": [{"name": "zh", "path": str(data_file)}]}
    assert problems_of(raw, [override]) == [expected]


def test_override_selects_dataset_by_index(data_file):
    raw = {"datasets": [{"name": "zh", "path": str(data_file)}, {"name": "en", "path": str(data_file)}]}
    assert load_recipe(raw, ["datasets.1.lora.r=3"]).dataset("en").lora.r == 3


# --------------------------------------------------------------------------- all errors at once


def test_every_problem_is_reported_at_once(tmp_path, data_file):
    path = write_recipe(tmp_path / "bad.yaml", {
        "defaults": {"lora": {"r": 0}, "train": {"lrr": 1}},
        "datasets": [
            {"name": "zh", "path": "zh.json", "val_size": 1.5, "train": {"lrr": 2}},
            {"name": "zh", "path": "missing.json"},
            {"name": "en", "path": "zh.json", "lora": {"r": 8}, "val_sise": 0.2},
        ],
    })
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    problems = err.problems
    assert err.title == "recipe is invalid"
    assert has_line(problems, "the name 'zh' is used 2 times", "each adapter needs its own name")
    assert has_line(problems, "datasets[zh].path", str(tmp_path / "missing.json"), "does not exist")
    assert has_line(problems, "datasets[zh].val_size", "less than 1", "1.5")
    # an r: 0 inherited from defaults is reported once, as defaults.lora.r (not once per dataset)
    r_lines = [p for p in problems if "lora.r" in p]
    assert r_lines == ["defaults.lora.r: input should be greater than 0 (got 0)"]
    # unknown keys with a did-you-mean, in a dataset and in defaults
    assert has_line(problems, "datasets[zh].train.lrr", "unknown key 'lrr'", "did you mean 'lr'?")
    assert has_line(problems, "datasets[en].val_sise", "unknown key 'val_sise'", "did you mean 'val_size'?")
    assert [p for p in problems if p.startswith("defaults.train")] == [
        p for p in problems if p.startswith("defaults.train: unknown key 'lrr'; did you mean 'lr'?")]
    assert len([p for p in problems if p.startswith("defaults.train")]) == 1
    assert not has_line(problems, "datasets[en].train.lrr")  # inherited: reported only under defaults
    assert len(problems) == len(set(problems))
    # the rendered message lists every line
    assert all(f"  - {p}" in str(err) for p in problems)


def test_unknown_top_level_and_model_keys(data_file):
    problems = problems_of({"modle": {}, "model": {"dtyp": "auto"},
                            "datasets": [{"name": "zh", "path": str(data_file)}]})
    assert "modle: unknown key 'modle'; did you mean 'model'? known: model, run_name, output_dir, defaults, " \
           "datasets, distributed" in problems
    assert has_line(problems, "model.dtyp", "did you mean 'dtype'?")


def test_internal_base_dir_is_not_a_recipe_key(data_file):
    problems = problems_of({"base_dir": "/elsewhere", "datasets": [{"name": "zh", "path": str(data_file)}]})
    assert problems == ["base_dir: unknown key 'base_dir'; known: model, run_name, output_dir, defaults, datasets, "
                        "distributed"]


def test_bad_dataset_name_and_empty_target_modules(data_file):
    problems = problems_of({"datasets": [{"name": "a b", "path": str(data_file), "target_modules": []}]})
    assert has_line(problems, "name", "use letters, digits", "'a b'")
    assert has_line(problems, "target_modules is empty", "all-linear")


def test_no_datasets(tmp_path):
    problems = problems_of(write_recipe(tmp_path / "r.yaml", {"model": {"path": "default"}}))
    assert has_line(problems, "datasets: required; add it")


# --------------------------------------------------------------------------- YAML and paths


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write_recipe(tmp_path / "broken.yaml", "datasets:\n  - name: a\n    path: a.json\n   lora: {r: 1}\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:4:")
    assert "malformed YAML" in problems[0] and "indentation" in problems[0]


def test_recipe_must_be_a_mapping(tmp_path):
    path = write_recipe(tmp_path / "list.yaml", "- a\n- b\n")
    assert problems_of(path) == [f"{path}: a recipe is a mapping (model:, defaults:, datasets:), got list"]


def test_missing_recipe_file_suggests_init(tmp_path):
    path = tmp_path / "nope.yaml"
    assert has_line(problems_of(path), str(path), "does not exist", "loraplex init")


def test_relative_paths_resolve_against_recipe_folder(tmp_path, monkeypatch, data_file):
    (tmp_path / "sub").mkdir()
    write_json(tmp_path / "sub" / "val.json", ROW)
    path = write_recipe(tmp_path / "sub" / "r.yaml", {"datasets": [
        {"name": "zh", "path": "../zh.json", "val_path": "val.json"}]})
    monkeypatch.chdir(tmp_path.parent)  # cwd differs from the recipe's folder
    recipe = load_recipe(path)
    assert recipe.base_dir == (tmp_path / "sub").resolve()
    spec = recipe.dataset("zh")
    assert recipe.resolve(spec.path).resolve() == data_file.resolve()
    assert recipe.resolve(spec.val_path).resolve() == (tmp_path / "sub" / "val.json").resolve()
    assert recipe.run_name == "r"
    assert recipe.run_dir() == (tmp_path / "sub").resolve() / "runs" / "r"


def test_unknown_dataset_lookup_suggests(data_file):
    recipe = load_recipe({"datasets": [{"name": "zh", "path": str(data_file)}]})
    with pytest.raises(RecipeError, match=r"unknown dataset 'zhh'; did you mean 'zh'\? known: zh"):
        recipe.dataset("zhh")


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_changes_with_any_value(data_file):
    raw = {"datasets": [{"name": "zh", "path": str(data_file)}]}
    base = load_recipe(raw).fingerprint()
    assert load_recipe(raw).fingerprint() == base
    for override in ("datasets.zh.lora.r=8", "defaults.train.lr=1e-3", "model.dtype=float32",
                     "datasets.zh.target_modules=[k_proj]"):
        assert load_recipe(raw, [override]).fingerprint() != base, override
    # the same settings spelled via defaults give the same fingerprint
    via_defaults = {"defaults": {"lora": {"r": 8}}, "datasets": [{"name": "zh", "path": str(data_file)}]}
    assert load_recipe(via_defaults).fingerprint() == load_recipe(raw, ["datasets.zh.lora.r=8"]).fingerprint()


def test_fingerprint_ignores_settings_that_change_nothing(data_file):
    """`auto` without target_modules: auto, an empty compose_with, report_to (any), the default checker and the
    `distributed:` block leave the fingerprint of runs written before those fields existed as it was (their hash of
    the same recipe without the keys)."""
    import hashlib
    import json

    raw = {"datasets": [{"name": "zh", "path": str(data_file)}, {"name": "en", "path": str(data_file)}]}
    recipe = load_recipe(raw)
    old_style = recipe.to_dict()
    del old_style["distributed"]  # how processes share the work
    for entry in old_style["datasets"]:
        del entry["auto"], entry["compose_with"], entry["report_to"], entry["checker"]
        for key in ("init", "loraplus_lr_ratio", "rank_pattern", "alpha_pattern"):  # LoRA variants, at defaults
            del entry["lora"][key]
    assert recipe.fingerprint() == hashlib.sha256(json.dumps(old_style, sort_keys=True).encode()).hexdigest()[:16]
    assert load_recipe(raw, ["defaults.report_to=[tensorboard, mlflow]"]).fingerprint() == recipe.fingerprint()
    assert load_recipe(raw, ["datasets.zh.auto.trials=1"]).fingerprint() == recipe.fingerprint()
    assert load_recipe(raw, ["distributed.strategy=fsdp"]).fingerprint() == recipe.fingerprint()
    auto = load_recipe(raw, ["datasets.zh.target_modules=auto"])
    assert load_recipe(raw, ["datasets.zh.target_modules=auto", "datasets.zh.auto.trials=1"]).fingerprint() \
        != auto.fingerprint() != recipe.fingerprint()
    assert load_recipe(raw, ["datasets.zh.compose_with=[en]"]).fingerprint() != recipe.fingerprint()
    assert load_recipe(raw, ["datasets.zh.lora.init=pissa"]).fingerprint() != recipe.fingerprint()


# --------------------------------------------------------------------------- shipped recipes


def _shipped_recipes() -> list[Path]:
    return sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", _shipped_recipes(), ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = [f for d in raw["datasets"] for f in ([d["path"]] if isinstance(d["path"], str) else d["path"])
               if not (path.parent / f).is_file()]
    if missing:
        pytest.skip(f"data files absent: {missing} (SHARED_DATA={SHARED_DATA})")
    recipe = load_recipe(path)
    assert recipe.datasets and recipe.run_name == path.stem


def test_packaged_example_recipe_validates(tmp_path):
    text = resources.files("loraplex").joinpath("recipes/example.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    (tmp_path / "data").mkdir()
    for entry in raw["datasets"]:
        write_json(tmp_path / entry["path"], ROW)  # the schema is what is checked; contents are placeholders
    path = tmp_path / "example.yaml"
    path.write_text(text, encoding="utf-8")
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert [d.name for d in recipe.datasets] == ["zh", "en", "ja"]
    assert recipe.dataset("en").lora.r == 8 and recipe.dataset("zh").lora.r == 16
    assert recipe.dataset("ja").train.lr == pytest.approx(1e-4)
    assert recipe.dataset("ja").target_modules == "all-linear"


def test_packaged_example_without_its_data_lists_each_missing_file(tmp_path):
    shutil.copy(Path(str(resources.files("loraplex").joinpath("recipes/example.yaml"))), tmp_path / "r.yaml")
    problems = problems_of(tmp_path / "r.yaml")
    for name in ("zh.json", "en.jsonl", "ja.jsonl"):
        assert has_line(problems, str(tmp_path / "data" / name), "does not exist")
