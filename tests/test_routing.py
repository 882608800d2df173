"""`model: auto` measured: how often the router sends a dataset's held-out prompts to an adapter trained on it."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from loraplex import train
from loraplex.cli import app
from loraplex.evaluate import evaluate_run

ENGLISH = [{"instruction": f"Please repeat the English word {w} twice.", "input": "", "output": f"{w} {w}"}
           for w in ["apple", "river", "stone", "cloud", "amber", "pilot"] * 5]
CHINESE = [{"instruction": f"请把这个词重复两遍：{w}", "input": "", "output": f"{w}{w}"}
           for w in ["苹果", "河流", "石头", "云朵", "琥珀", "飞行"] * 5]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    write_jsonl(tmp / "en.jsonl", ENGLISH)
    write_jsonl(tmp / "zh.jsonl", CHINESE)
    recipe = {"model": {"path": str(tiny_model_dir), "dtype": "float32"}, "output_dir": str(tmp / "runs"),
              "run_name": "r", "defaults": {"train": {"max_steps": 6, "lr": 3e-2, "batch_size": 8},
                                            "lora": {"r": 4, "alpha": 8}, "val_size": 0.2},
              "datasets": [{"name": "en", "path": str(tmp / "en.jsonl"), "target_modules": ["q_proj"]},
                           {"name": "zh", "path": str(tmp / "zh.jsonl"), "target_modules": ["v_proj"]},
                           {"name": "en_mlp", "path": str(tmp / "en.jsonl"), "target_modules": ["up_proj"]}]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(tmp / "home"))
        result = train(recipe, progress=False)
        return result, evaluate_run(result.run_dir, generation={"enabled": False})


def test_held_out_prompts_are_routed_to_their_datasets_adapter(run):
    result, evaluation = run
    routing = evaluation["routing"]
    # en and en_mlp share a data file: one centroid, routed to the one with the lower held-out loss
    best_en = min(("en", "en_mlp"), key=lambda n: result.adapters[n]["heldout_loss"])
    assert routing["routes_to"] == sorted([best_en, "zh"])
    heldout = {c["name"]: c["heldout_examples"] for c in evaluation["columns"]}
    for name, right in (("en", {"en", "en_mlp"}), ("zh", {"zh"}), ("en_mlp", {"en", "en_mlp"})):
        cell = routing["datasets"][name]
        assert set(cell["right"]) == right and cell["prompts"] == heldout[name] >= 5
        assert cell["accuracy"] == 1.0, cell  # English and Chinese prompts are far apart for any base
        assert sum(cell["routed"].values()) == heldout[name] and set(cell["routed"]) <= right | {"base"}


def test_eval_command_prints_the_routing_row(run):
    result, evaluation = run
    done = CliRunner().invoke(app, ["eval", str(result.run_dir), "--no-generate"])
    assert done.exit_code == 0, done.output
    flat = " ".join(done.output.split())
    assert "auto: routed to its" in flat
    assert all(f"100% of {cell['prompts']}" in flat for cell in evaluation["routing"]["datasets"].values())
