"""`compose_with`: an adapter trained on top of others (loaded, active, frozen), so their sum is the model it
trained in."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from loraplex import train
from loraplex.errors import LoraplexError, RecipeError
from loraplex.merging import merge
from loraplex.recipe import load_recipe
from loraplex.training import runner

WORDS = ["apple", "river", "stone", "cloud", "amber", "pilot", "maple", "ocean"]
ROWS_EN = [{"instruction": f"Repeat {w}, {i}.", "input": "", "output": f"{w} {w}"} for i, w in enumerate(WORDS * 4)]
ROWS_ZH = [{"instruction": f"Reverse {w}, {i}.", "input": "", "output": w[::-1]} for i, w in enumerate(WORDS * 4)]


def make_recipe(tmp: Path, model_dir: Path, compose: dict[str, list[str]] | None = None) -> dict:
    write_jsonl(tmp / "en.jsonl", ROWS_EN)
    write_jsonl(tmp / "zh.jsonl", ROWS_ZH)
    compose = compose if compose is not None else {"zh": ["en"]}
    datasets = [{"name": "zh", "path": str(tmp / "zh.jsonl"), "target_modules": ["q_proj"]},  # listed first:
                {"name": "en", "path": str(tmp / "en.jsonl"), "target_modules": ["v_proj"]}]  # trains second
    for d in datasets:
        d["compose_with"] = compose.get(d["name"], [])
    return {"model": {"path": str(model_dir), "dtype": "float32"}, "output_dir": str(tmp / "runs"), "run_name": "c",
            "defaults": {"val_size": 0.25, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                         "train": {"max_steps": 12, "lr": 3e-2, "batch_size": 8, "save_steps": 100}},
            "datasets": datasets}


@pytest.fixture(scope="module")
def composed(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compose")
    os.environ["LORAPLEX_HOME"] = str(tmp / "home")
    seen = {}
    real = runner.compose

    def recording(peft_model, spec, run_dir):
        fingerprints = real(peft_model, spec, run_dir)
        if spec.compose_with:  # the composed adapters' tensors as the training holds them
            seen.update({n: p for n, p in peft_model.named_parameters() if ".en." in n})
            seen["trainable"] = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
        return fingerprints

    runner.compose = recording
    try:
        result = train(make_recipe(tmp, tiny_model_dir), progress=False)
    finally:
        runner.compose = real
    return result, seen


def test_the_adapters_composed_with_stay_frozen_bit_for_bit(composed):
    result, seen = composed
    assert list(result.adapters) == ["en", "zh"]  # en trained first, though listed second
    en_file = result.run_dir / "adapters" / "en" / "adapter_model.safetensors"
    saved = load_file(en_file)
    held = {k: v for k, v in seen.items() if k != "trainable"}
    assert held and all(".default." in n or "lora_" in n for n in seen["trainable"])
    assert not any(".en." in n for n in seen["trainable"])
    for name, param in held.items():  # after zh's training: still the file's values
        key = name.replace(".en.", ".")
        assert torch.equal(param.detach(), saved[key]), name
    meta = result.adapters["zh"]
    assert meta["compose_with"] == {"en": hashlib.sha256(en_file.read_bytes()).hexdigest()[:16]}
    zh_keys = load_file(result.run_dir / "adapters" / "zh" / "adapter_model.safetensors").keys()
    assert zh_keys and all("q_proj" in k for k in zh_keys)  # only zh's own weights are saved


def test_the_sum_is_the_model_the_adapter_trained_in(composed):
    result, _ = composed
    meta = result.adapters["zh"]
    assert meta["heldout_loss_composed"] != pytest.approx(meta["heldout_loss"], abs=1e-4)  # en mattered
    report = merge(result.run_dir, ["zh", "en"], out_dir=result.run_dir.parent / "zh+en")
    assert report.heldout["datasets"]["zh"]["merged"] == pytest.approx(meta["heldout_loss_composed"], abs=1e-4)


@pytest.mark.parametrize("compose, message", [
    ({"zh": ["fr"]}, "datasets[zh].compose_with: unknown dataset 'fr'"),
    ({"zh": ["zh"]}, "'zh' is this dataset itself"),
    ({"zh": ["en"], "en": ["zh"]}, "a cycle (zh -> en -> zh)"),
])
def test_bad_compose_with_is_refused(tmp_path, tiny_model_dir, compose, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(make_recipe(tmp_path, tiny_model_dir, compose))
    assert message in str(info.value)


def test_composing_with_an_untrained_adapter_says_to_train_it_first(tmp_path, tiny_model_dir):
    with pytest.raises(LoraplexError, match=r"compose_with: en not trained yet .* train it first"):
        train(make_recipe(tmp_path, tiny_model_dir), only=["zh"], progress=False)


def test_a_union_entry_trains_on_exactly_the_union_of_the_rows(tmp_path, tiny_model_dir):
    """The union baseline of benchmarks/merge_retention.py: one entry whose path and val_path list every file."""
    from loraplex.pipeline import open_recipe

    write_jsonl(tmp_path / "en_val.jsonl", ROWS_EN[:4])
    write_jsonl(tmp_path / "zh_val.jsonl", ROWS_ZH[:4])
    recipe = make_recipe(tmp_path, tiny_model_dir, compose={})
    for d in recipe["datasets"]:
        d["val_path"] = str(tmp_path / f"{d['name']}_val.jsonl")
    recipe["datasets"].append({"name": "union", "target_modules": ["q_proj", "v_proj"],
                               "path": [recipe["datasets"][0]["path"], recipe["datasets"][1]["path"]],
                               "val_path": [recipe["datasets"][0]["val_path"], recipe["datasets"][1]["val_path"]]})
    prepared = open_recipe(recipe).prepare()

    def rows(split):
        return sorted(tuple(r["input_ids"]) for r in split)

    assert rows(prepared["union"].train) == sorted(rows(prepared["zh"].train) + rows(prepared["en"].train))
    assert rows(prepared["union"].val) == sorted(rows(prepared["zh"].val) + rows(prepared["en"].val))
    assert len(prepared["union"].train) == len(ROWS_EN) + len(ROWS_ZH)
