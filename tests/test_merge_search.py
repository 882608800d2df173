"""`loraplex merge --method weights-search`: weights searched on half of each held-out split, reported on the other."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import write_jsonl
from loraplex.errors import LoraplexError
from loraplex.merging import merge, search

WORDS = ["apple", "river", "stone", "cloud", "amber", "pilot", "maple", "ocean"]
ROWS_A = [{"instruction": f"Repeat the word {w}, {i}.", "input": "", "output": f"{w} {w}"}
          for i, w in enumerate(WORDS * 4)]  # every row different: the halves share no row
ROWS_B = [{"instruction": f"Spell {w} backwards, {i}.", "input": "", "output": w[::-1]}
          for i, w in enumerate(WORDS * 4)]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> Path:
    from loraplex import train

    tmp = tmp_path_factory.mktemp("search")
    os.environ["LORAPLEX_HOME"] = str(tmp / "home")
    write_jsonl(tmp / "a.jsonl", ROWS_A)
    write_jsonl(tmp / "b.jsonl", ROWS_B)
    recipe = {"model": {"path": str(tiny_model_dir), "dtype": "float32"}, "output_dir": str(tmp / "runs"),
              "run_name": "t", "defaults": {"val_size": 0.25, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                                            "train": {"max_steps": 40, "lr": 3e-2, "batch_size": 8, "save_steps": 100}},
              "datasets": [{"name": "a", "path": str(tmp / "a.jsonl"), "target_modules": ["q_proj"]},
                           {"name": "b", "path": str(tmp / "b.jsonl"), "target_modules": ["v_proj"]}]}
    run_dir = train(recipe, progress=False).run_dir
    # b2: adapter b (trained to convergence) with its change doubled, recorded as a dataset of the run (b's data)
    b2 = run_dir / "adapters" / "b2"
    shutil.copytree(run_dir / "adapters" / "b", b2)
    tensors = load_file(b2 / "adapter_model.safetensors")
    save_file({k: v * 2 if "lora_B" in k else v for k, v in tensors.items()}, b2 / "adapter_model.safetensors")
    meta = json.loads((b2 / "loraplex.json").read_text())
    (b2 / "loraplex.json").write_text(json.dumps({**meta, "name": "b2"}))
    resolved = run_dir / "recipe.resolved.yaml"
    import yaml
    data = yaml.safe_load(resolved.read_text())
    data["datasets"].append({**data["datasets"][1], "name": "b2"})
    resolved.write_text(yaml.safe_dump(data, allow_unicode=True))
    return run_dir


def test_the_search_never_grades_on_the_rows_it_reports(run, monkeypatch):
    seen: list[tuple] = []
    real = search.heldout_metrics

    def recording(model, rows, *args, **kwargs):
        seen.extend(tuple(r["input_ids"]) for r in rows)
        return real(model, rows, *args, **kwargs)

    monkeypatch.setattr(search, "heldout_metrics", recording)
    from loraplex.merging.plan import plan_merge
    from loraplex.merging.verify import heldout_splits

    splits = heldout_splits(plan_merge(run, ["a", "b"], None, "sum", "float32"))
    report = merge(run, ["a", "b"], method="weights-search", out_dir=run.parent / "ab")
    for name, split in splits.items():
        rows = [tuple(r["input_ids"]) for r in split]
        searched, reported = set(rows[0::2]), set(rows[1::2])
        assert searched and reported and not searched & reported
        assert set(seen) & set(rows) <= searched  # every row the search read is a search row
        assert report.heldout["datasets"][name]["rows"] == len(rows[1::2])
    assert report.weights_search["search_rows"] == {n: (len(s) + 1) // 2 for n, s in splits.items()}


def test_the_search_finds_the_weight_that_undoes_a_doubled_adapter(run):
    report = merge(run, ["a", "b2"], method="weights-search", out_dir=run.parent / "ab2")
    found = report.weights_search
    assert found["weights"]["b2"] < 1 and set(found["weights"].values()) <= set(search.GRID)
    assert found["worst_retention_search"]["found"] > found["worst_retention_search"]["at_weights_1"]
    assert [a.weight for a in report.adapters] == [found["weights"]["a"], found["weights"]["b2"]]
    weights = report.verification["weights"]  # the saved model is the exact sum at the found weights (checked)
    assert all(m["passed"] for m in weights["modules"].values()) and weights["max_relative"] < 1e-4
    plain = merge(run, ["a", "b2"], out_dir=run.parent / "ab2-sum").heldout["datasets"]["b2"]["kept"]
    assert report.heldout["datasets"]["b2"]["kept"] > plain  # on its unseen rows too: 1 was the wrong weight


def test_weights_search_refusals(run, tiny_model_dir):
    with pytest.raises(LoraplexError, match="chooses the weights itself"):
        merge(run, ["a", "b"], weights=[1, 1], method="weights-search", out_dir=run.parent / "x")
    from test_merge import make_adapter

    make_adapter(run, "stray", tiny_model_dir, ["k_proj"])
    with pytest.raises(LoraplexError, match="stray: not a dataset of the run's recipe"):
        merge(run, ["a", "stray"], method="weights-search", out_dir=run.parent / "y")


def test_cli_merge_weights_search_says_where_the_weights_come_from(run):
    from typer.testing import CliRunner
    from loraplex.cli import app

    out = run.parent / "cli-search"
    result = CliRunner().invoke(app, ["merge", str(run), "--adapters", "a,b2", "--out", str(out),
                                      "--method", "weights-search"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "method weights-search → sum, exact" in text and "weights found: a " in text
    assert "the table below is on the other rows" in text


def test_the_eval_matrix_grades_a_searched_merge_only_on_rows_the_search_never_read(run):
    from loraplex.evaluation import evaluate_run

    report = merge(run, ["a", "b"], method="weights-search", out_dir=run.parent / "ab-eval")
    result = evaluate_run(run, merged=[run.parent / "ab-eval"], generation={"enabled": False})
    merged, columns = result.metrics["merged:ab-eval"], {c["name"]: c for c in result.columns}
    for name in ("a", "b", "b2"):  # b2 holds b's data: the search read the even rows of that split too
        kept = report.heldout["datasets"][name if name != "b2" else "b"]
        cell = merged[name]
        assert cell["loss"] == pytest.approx(kept["merged"], abs=1e-4)  # the merge report's own unsearched rows
        assert cell["heldout_examples"] == kept["rows"] == columns[name]["heldout_examples"] // 2
        assert cell["same_rows_adapter"] == kept["adapter"] and cell["same_rows_base"] == kept["base"]
        assert "the weight search read the even ones" in cell["heldout_rows"]
    for name in ("a", "b"):  # the adapters' own rows still cover the whole held-out split, as training reported it
        assert result.metrics[name][name]["loss"] == pytest.approx(
            json.loads((run / "adapters" / name / "loraplex.json").read_text())["heldout_loss"], abs=1e-5)


@pytest.mark.parametrize("peak", [0.25, 0.75, 1.0, 2.0, 3.0])
def test_the_climb_reaches_a_single_peak_trying_few_weightings(peak):
    tried = []

    def score(weights: dict[str, float]) -> float:
        tried.append(weights["b"])
        return -abs(weights["b"] - peak) - abs(weights["a"] - 1.0)  # one peak along b, a stays

    found = search._climb({"a": 1.0, "b": 1.0}, "b", score)
    assert found == {"a": 1.0, "b": peak}
    assert len(set(tried)) <= abs(search.GRID.index(peak) - search.GRID.index(1.0)) + 3 < len(search.GRID)
