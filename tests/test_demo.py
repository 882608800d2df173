"""`loraplex demo` end to end on a tiny random model (the real demo runs in `make demo`)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.demo.data import DEMO_ADAPTERS
from loraplex.demo.command import demo_recipe, run_demo, targets_met, time_breakdown
from loraplex.errors import LoraplexError, ParameterError
from loraplex.recipe import load_recipe
from loraplex.run import adapter_metadata

SMALL = {"n_train": 16, "n_val": 4, "n_test": 4}


def test_demo_recipe_puts_each_language_on_its_modules(tmp_path):
    recipe = demo_recipe(seed=3)
    targets = {d["name"]: d["target_modules"] for d in recipe["datasets"]}
    assert targets == {"zh": ["q_proj"], "en": ["v_proj"], "ja": ["v_proj"], "zh_all": "all-linear",
                       "zh_auto": "auto"}
    assert recipe["defaults"]["train"]["seed"] == 3


def row(loss_base, loss_adapter, em_base, em_adapter) -> dict:
    return {"heldout_loss_base": loss_base, "heldout_loss_adapter": loss_adapter, "exact_match_base": em_base,
            "exact_match_adapter": em_adapter}


@pytest.mark.parametrize("values, met", [
    ((2.0, 1.4, 0.0, 0.2), (True, True)),  # exactly -30% and +20 points
    ((2.0, 1.41, 0.1, 0.29), (False, False)),
    ((2.0, float("nan"), None, 0.5), (False, False)),  # nothing measured is nothing met
    ((2.0, 0.2, 0.5, 0.4), (True, False)),
])
def test_demo_targets(values, met):
    assert tuple(targets_met(row(*values)).values()) == met


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "my-demo"  # the run folder is --out itself, whatever its name
    overrides = [f"model.path={tiny_model_dir}", "defaults.train.max_steps=2", "defaults.lora.r=2"]
    summary = run_demo(out, seed=1, overrides=overrides, sizes=SMALL, progress=False)
    run_dir = out
    assert summary["run_dir"] == str(out) and not (tmp_path / "demo").exists()
    assert {r["dataset"] for r in summary["results"]} == set(DEMO_ADAPTERS)
    for row in summary["results"]:
        assert row["heldout_loss_base"] > 0 and row["heldout_loss_adapter"] > 0
        assert 0.0 <= row["exact_match_base"] <= 1.0 and 0.0 <= row["exact_match_adapter"] <= 1.0
    merged = {r["dataset"]: r for r in summary["results"] if r["heldout_loss_merged"] is not None}
    assert set(merged) == {"zh", "en"}
    assert (run_dir / "merged" / "zh+en" / "model.safetensors").is_file()
    assert (run_dir / "report.html").is_file() and (run_dir / "eval.json").is_file()
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "## Module selection (target_modules: auto)" in report and "zh_auto: budget" in report
    assert "## One model for all datasets" in report and "merged:zh+en" in report
    saved = json.loads((run_dir / "demo_results.json").read_text(encoding="utf-8"))
    assert saved["results"] == json.loads(json.dumps(summary["results"]))
    timings = {row["phase"]: row["seconds"] for row in saved["timings"]}
    assert {f"training {name}" for name in DEMO_ADAPTERS} < set(timings) and min(timings.values()) >= 0
    assert timings["model loads (train, merge, its check, eval)"] > 0 and timings["evaluation: generation"] > 0
    assert sum(timings.values()) - timings["total"] == pytest.approx(timings["total"], abs=0.1)
    # the recipe written into the run folder is a valid recipe with the generated data beside it
    recipe = load_recipe(out / "demo.yaml")
    assert recipe.resolve(recipe.dataset("ja").files("test_path")[0]).is_file()
    # a bad override is refused before anything is replaced
    data = {p: p.read_bytes() for p in sorted((out / "data").rglob("*.jsonl"))}
    adapters = {p: p.read_bytes() for p in sorted((out / "adapters").rglob("adapter_model.safetensors"))}
    with pytest.raises(LoraplexError, match="defaults.lora.r"):
        run_demo(out, seed=2, overrides=overrides + ["defaults.lora.r=0"], sizes=SMALL, progress=False)
    assert data == {p: p.read_bytes() for p in sorted((out / "data").rglob("*.jsonl"))}
    assert adapters == {p: p.read_bytes() for p in sorted((out / "adapters").rglob("adapter_model.safetensors"))}
    # run again into its own folder with another seed: new data, every adapter retrained on it, a full summary
    again = run_demo(out, seed=2, overrides=overrides, sizes=SMALL, progress=False)
    assert again["seed"] == 2 and {r["dataset"] for r in again["results"]} == set(DEMO_ADAPTERS)
    assert data != {p: p.read_bytes() for p in sorted((out / "data").rglob("*.jsonl"))}
    assert all(adapter_metadata(out / "adapters" / name)["config"]["train"]["seed"] == 2 for name in DEMO_ADAPTERS)
    assert sorted(p.name for p in (out / "adapters").iterdir()) == sorted(DEMO_ADAPTERS)


def test_time_breakdown_names_each_phase_once_and_adds_up():
    steps = {"data": {"seconds": 1.0, "phases": {}},
             "train": {"seconds": 50.0, "phases": {"prepare": 2.0, "model load": 3.0, "selection": 5.0}},
             "merge": {"seconds": 20.0, "phases": {"model load": 4.0, "prepare": 1.0, "weight search": 10.0}},
             "evaluate": {"seconds": 30.0, "phases": {"model load": 2.0, "prepare": 0.5,
                                                      "evaluation: held-out losses": 6.0,
                                                      "evaluation: generation": 12.0, "evaluation: routing": 1.0}},
             "report": {"seconds": 4.0, "phases": {}}}
    rows = {row["phase"]: row["seconds"] for row in time_breakdown(steps, {"zh": 20.0, "en": 15.0}, 110.0)}
    assert rows["prepare: data written, recipe checked, tokenized"] == 4.5
    assert rows["model loads (train, merge, its check, eval)"] == 9.0
    assert rows["selection (target_modules: auto)"] == 5.0 and rows["training zh"] == 20.0
    assert rows["training: other (recipe opened, adapters saved and reloaded, isolation checks)"] == 5.0
    assert rows["merge: weight search"] == 10.0 and rows["merge: writing and verifying"] == 5.0
    assert rows["evaluation: generation"] == 12.0 and rows["evaluation: test splits, scores, eval.json"] == 8.5
    assert rows["report"] == 4.0 and rows["other"] == 5.0 and rows["total"] == 110.0


@pytest.mark.parametrize("inside", [["notes.txt"], ["run.json", "notes.txt"]])
def test_demo_refuses_a_folder_it_did_not_make(inside, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for name in inside:
        (out / name).write_text('{"recipe_fingerprint": "x"}', encoding="utf-8")
    with pytest.raises(ParameterError, match=f"out_dir: {out} exists and was not made by `loraplex demo`; choose"):
        run_demo(out, seed=0, sizes=SMALL, progress=False)
    refused = CliRunner().invoke(app, ["demo", "--out", str(out)])  # the CLI names its flag
    assert refused.exit_code == 2 and "error: --out: " in refused.output and "out_dir" not in refused.output
    assert sorted(p.name for p in out.iterdir()) == sorted(inside)


@pytest.mark.slow
def test_demo_cli_prints_the_table(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("loraplex.demo.command.DEMO_SIZES", SMALL)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), f"model.path={tiny_model_dir}",
                                      "defaults.train.max_steps=1"])
    assert result.exit_code == 0, result.output
    for name in DEMO_ADAPTERS:
        assert name in result.output
    assert "merged zh+en" in result.output and "report:" in result.output
    assert "where the time went" in result.output and "evaluation: generation" in result.output
    out = " ".join(result.output.split())  # the console wraps long lines
    assert f"run folder: {(tmp_path / 'd').resolve()}" in out
    # how much of each adapter's held-out gain the merged model keeps, as merge_report.json has it
    heldout = json.loads((tmp_path / "d" / "merged" / "zh+en" / "merge_report.json").read_text())["heldout"]
    for name, row in heldout["datasets"].items():
        kept = f"{row['kept']:.0%}" if row["kept"] is not None else "n/a"
        assert f"{name} {kept}" in out
