"""Runs that never lose a finished adapter: incremental training by per-adapter fingerprints, writers that lock
what they write, leftovers of interrupted writes, compose_with checks, and kills at any point of a retrain."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from loraplex import train
from loraplex.errors import LoraplexError
from loraplex.run import adapter_metadata, complete_adapters, is_complete, weights_hash
from loraplex.training.plan import KEEP, NEW, NOT_IN_RECIPE, NOT_NAMED, REMOVED, RETRAIN

ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "amber", "pilot"] * 4]


def make_recipe(tmp: Path, model_dir: Path, dtype: str = "float32") -> dict:
    write_jsonl(tmp / "a.jsonl", ROWS)
    write_jsonl(tmp / "b.jsonl", list(reversed(ROWS)))
    return {"model": {"path": str(model_dir), "dtype": dtype}, "output_dir": str(tmp / "runs"), "run_name": "t",
            "defaults": {"train": {"max_steps": 2, "lr": 1e-2, "batch_size": 4, "save_steps": 1, "logging_steps": 1},
                         "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "val_size": 0.2},
            "datasets": [{"name": "a", "path": str(tmp / "a.jsonl"), "target_modules": ["q_proj"]},
                         {"name": "b", "path": str(tmp / "b.jsonl"), "target_modules": ["v_proj"]}]}


def actions(result) -> dict[str, str]:
    return {step.name: step.action for step in result.steps}


def file_state(folder: Path) -> tuple:
    """What must not change for a kept adapter: its weights' bytes and its files' modification times."""
    return weights_hash(folder), tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()))


@pytest.fixture(params=["float32", "bfloat16"])  # forced: the same on every CPU
def run(request, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    recipe = make_recipe(tmp_path, tiny_model_dir, request.param)
    first = train(recipe, progress=False)
    assert actions(first) == {"a": NEW, "b": NEW}
    return recipe, first.run_dir


def test_only_after_a_change_retrains_that_adapter_and_keeps_the_other(run):
    recipe, run_dir = run
    a_before, b_before = file_state(run_dir / "adapters" / "a"), weights_hash(run_dir / "adapters" / "b")
    recipe["datasets"][1]["train"] = {"lr": 5e-3}  # en's learning rate, as after a NaN
    result = train(recipe, only=["b"], progress=False)  # no flag needed
    assert actions(result) == {"a": NOT_NAMED, "b": RETRAIN}
    assert "train.lr 0.01 -> 0.005" in next(s.reason for s in result.steps if s.name == "b")
    assert file_state(run_dir / "adapters" / "a") == a_before
    assert weights_hash(run_dir / "adapters" / "b") != b_before
    assert adapter_metadata(run_dir / "adapters" / "b")["config"]["train"]["lr"] == 5e-3
    again = train(recipe, progress=False)
    assert actions(again) == {"a": KEEP, "b": KEEP} and file_state(run_dir / "adapters" / "a") == a_before
    # the resolved recipe records the settings each adapter trained with
    from loraplex.run import read_recipe
    entries = {e["name"]: e for e in read_recipe(run_dir)["datasets"]}
    assert entries["b"]["train"]["lr"] == 5e-3 and entries["a"]["train"]["lr"] == 1e-2


def test_how_it_trains_is_not_what_it_trains(run):
    recipe, run_dir = run
    before = {n: file_state(run_dir / "adapters" / n) for n in "ab"}
    recipe["defaults"]["train"].update(save_steps=7, logging_steps=3, micro_batch_tokens=64)
    assert actions(train(recipe, progress=False)) == {"a": KEEP, "b": KEEP}
    assert {n: file_state(run_dir / "adapters" / n) for n in "ab"} == before


def test_a_new_dataset_trains_alone_and_a_removed_one_is_kept(run, tmp_path):
    recipe, run_dir = run
    a_state = file_state(run_dir / "adapters" / "a")
    recipe["datasets"].append({"name": "c", "path": str(tmp_path / "a.jsonl"), "target_modules": ["k_proj"]})
    assert actions(train(recipe, progress=False)) == {"a": KEEP, "b": KEEP, "c": NEW}
    recipe["datasets"] = recipe["datasets"][1:]  # a leaves the recipe
    result = train(recipe, progress=False)
    assert actions(result) == {"b": KEEP, "c": KEEP, "a": NOT_IN_RECIPE}
    assert file_state(run_dir / "adapters" / "a") == a_state
    from loraplex.run import read_recipe
    assert "a" in {e["name"] for e in read_recipe(run_dir)["datasets"]}  # still evaluable and servable
    pruned = train(recipe, prune=True, progress=False)
    assert actions(pruned)["a"] == REMOVED and complete_adapters(run_dir) == ["b", "c"]


def test_overwrite_retrains_an_unchanged_adapter_and_a_base_change_retrains_all(run, tiny_model_dir):
    recipe, run_dir = run
    a_state = file_state(run_dir / "adapters" / "a")
    result = train(recipe, only=["b"], overwrite=True, progress=False)
    assert actions(result) == {"a": NOT_NAMED, "b": RETRAIN} and file_state(run_dir / "adapters" / "a") == a_state
    other = "bfloat16" if recipe["model"]["dtype"] == "float32" else "float32"
    recipe["model"]["dtype"] = other
    result = train(recipe, progress=False)
    assert actions(result) == {"a": RETRAIN, "b": RETRAIN}
    assert all(f"base.dtype {'float32' if other == 'bfloat16' else 'bfloat16'} -> {other}" in s.reason
               for s in result.steps)


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(run):
    recipe, run_dir = run
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LoraplexError, match=rf"adapter b is in use by pid {holder.pid} \(loraplex train\) since"):
            train(recipe, only=["b"], overwrite=True, progress=False)
        assert actions(train(recipe, only=["a"], progress=False)) == {"a": KEEP, "b": NOT_NAMED}  # a is free
    finally:
        holder.kill()
        holder.wait()
    heard = []
    result = train(recipe, only=["b"], progress=False, say=heard.append)
    assert actions(result)["b"] == KEEP
    assert any(f"took over the lock of pid {holder.pid}" in line and "no longer running" in line for line in heard)


HOLD_LOCK = """
import sys, time
from loraplex.run import writer_lock
with writer_lock(sys.argv[1], ["adapter-b"], "loraplex train"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_leftovers_of_an_interrupted_replace_are_never_adapters(run):
    recipe, run_dir = run
    root = run_dir / "adapters"
    import shutil
    shutil.copytree(root / "a", root / ".a.x1y2z3w4.tmp")  # a complete-looking temporary folder
    shutil.copytree(root / "a", root / ".a.b.k3j2h1g0.tmp")  # another adapter's ('a.b'), maybe being written now
    assert complete_adapters(run_dir) == ["a", "b"]
    b_hash = weights_hash(root / "b")
    os.replace(root / "b", root / ".b.old-q9r8s7t6")  # killed between the two renames of a replace
    assert complete_adapters(run_dir) == ["a"]
    heard = []
    result = train(recipe, progress=False, say=heard.append)
    assert actions(result) == {"a": KEEP, "b": KEEP}  # b was put back, not retrained
    assert weights_hash(root / "b") == b_hash
    assert sorted(p.name for p in root.iterdir()) == [".a.b.k3j2h1g0.tmp", "a", "b"]
    assert any(".a.x1y2z3w4.tmp" in line for line in heard)


def test_compose_with_hashes_are_checked_where_the_adapter_is_used(run, tmp_path):
    from loraplex.adapters import load
    from loraplex.vllm_export import vllm_command
    from loraplex.merging import plan_merge

    recipe, run_dir = run
    recipe["datasets"][1]["compose_with"] = ["a"]
    assert actions(train(recipe, progress=False)) == {"a": KEEP, "b": RETRAIN}  # compose_with changed b
    recipe["datasets"][0]["lora"] = {"r": 3, "alpha": 6}
    assert actions(train(recipe, only=["a"], progress=False))["a"] == RETRAIN
    folders = {n: run_dir / "adapters" / n for n in "ab"}
    expected = "adapter 'b' was trained on top of a (compose_with), and since then 'a' was retrained: train 'b' again"
    with pytest.raises(LoraplexError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load(recipe["model"]["path"], folders, dtype="float32")
    with pytest.raises(LoraplexError, match="train 'b' again"):
        plan_merge(run_dir, ["a", "b"], None, "sum", "float32")
    with pytest.raises(LoraplexError, match="train 'b' again"):
        vllm_command(run_dir)
    result = train(recipe, progress=False)
    assert actions(result) == {"a": KEEP, "b": RETRAIN}
    assert "a (composed with) was retrained" in next(s.reason for s in result.steps if s.name == "b")
    load(recipe["model"]["path"], folders, dtype="float32")  # consistent again


def test_stale_eval_and_merges_are_named_not_deleted(run, tmp_path, monkeypatch):
    from loraplex.evaluation import evaluate_run
    from loraplex.merging import merge
    from loraplex.run import stale_outputs

    recipe, run_dir = run
    merge(run_dir, ["a", "b"], out_dir=run_dir / "merged" / "a+b")
    evaluate_run(run_dir, merged=[run_dir / "merged" / "a+b"], generation={"enabled": False})
    assert stale_outputs(run_dir) == []
    recipe["datasets"][1]["lora"] = {"r": 3, "alpha": 6}
    result = train(recipe, progress=False)
    assert (run_dir / "merged" / "a+b" / "merge_report.json").is_file() and (run_dir / "eval.json").is_file()
    assert sorted(result.stale) == sorted([
        "eval.json, row 'b': made with 'b' before it was retrained",
        "eval.json, row 'merged:a+b': made with 'b' before it was retrained",
        "merged/a+b: made with 'b' before it was retrained"])
    # serve says so too, at start (the server itself is not started here)
    import types

    import uvicorn

    import loraplex.serving as serving
    fake = types.SimpleNamespace(state=types.SimpleNamespace(engine=types.SimpleNamespace(entries={}), router=None))
    monkeypatch.setattr(serving, "app", lambda *args, **kwargs: fake)
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    heard = []
    serving.serve(run_dir, merged=[run_dir / "merged" / "a+b"], log=heard.append)
    assert f"warning: {run_dir / 'merged' / 'a+b'} is stale: made with 'b' before it was retrained; merge again " \
           "to refresh it" in heard


def test_export_refuses_to_replace_a_file(run, tmp_path):
    from loraplex.vllm_export import export_vllm

    _, run_dir = run
    out = tmp_path / "serve.sh"
    out.write_text("mine", encoding="utf-8")
    with pytest.raises(LoraplexError, match="^out: .* exists; choose another file, or pass force=True"):
        export_vllm(run_dir, out)
    assert out.read_text(encoding="utf-8") == "mine"
    export_vllm(run_dir, out, force=True)
    assert "vllm serve" in out.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- kills during an incremental retrain

KILL_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
from kill_points import die, die_after_checkpoint
from loraplex import atomic
from loraplex.training import runner

recipe, point = json.loads(sys.argv[1]), sys.argv[2]
die_after_checkpoint(runner, lambda step: point == "checkpoint")
write_json = runner.write_record


def write_json_or_die(path, data):
    if point == "adapter-write" and path.name == "loraplex.json" and path.parent.name.startswith("."):
        die()  # the new PEFT files are in the temporary folder, its completeness marker is not
    write_json(path, data)
    if point == "after-replace" and path.name == "loraplex.json" and path.parent.name == "b":
        die()  # the new adapter is in place; the reload check and its final metadata are not done


real_replace, real_exchange = os.replace, atomic._exchange


def replace_or_die(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if point == "between-renames" and os.path.basename(str(dst)).startswith(".b.old-"):
        die()  # the old adapter is renamed aside and the new one not yet in its place


def exchange_or_die(a, b):
    if point == "exchange" and b.name == "b":
        real_exchange(a, b)
        die()  # the new adapter is in place, the old one in the temporary folder
    return real_exchange(a, b) if point != "between-renames" else False


runner.write_record = write_json_or_die
atomic.os.replace, atomic._exchange = replace_or_die, exchange_or_die
runner.train(recipe, only=["b"], progress=False)
raise SystemExit("not killed")
"""
KILL_POINTS = ["checkpoint", "adapter-write", "between-renames", "exchange", "after-replace"]


@pytest.fixture(scope="module")
def killed_retrains(tmp_path_factory, tiny_model_dir):
    """A two-adapter run, then b's retrain (after an lr change) killed at each point, the kills in parallel."""
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "LORAPLEX_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    runs, procs = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(home))
        for point in KILL_POINTS:
            recipe = make_recipe(tmp_path_factory.mktemp(point), tiny_model_dir)
            run_dir = train(recipe, progress=False).run_dir
            before = {n: weights_hash(run_dir / "adapters" / n) for n in "ab"}
            changed = copy.deepcopy(recipe)
            changed["datasets"][1]["train"] = {"lr": 5e-3}
            runs[point] = (changed, run_dir, before)
            procs[point] = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(changed), point], env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for point, proc in procs.items():
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == -9, f"{point}: {err.decode()[-2000:]}"
    return runs, home


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_during_a_retrain_leaves_every_finished_adapter_whole(point, killed_retrains, monkeypatch):
    runs, home = killed_retrains
    recipe, run_dir, before = runs[point]
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    root = run_dir / "adapters"
    assert weights_hash(root / "a") == before["a"]
    if point != "between-renames":  # there b sits renamed aside until the next open puts it back
        assert is_complete(root / "b") and complete_adapters(run_dir) == ["a", "b"]
        meta = adapter_metadata(root / "b")
        assert (weights_hash(root / "b") == before["b"]) == (meta["config"]["train"]["lr"] == 1e-2)  # old or new
        load_file(root / "b" / "adapter_model.safetensors")
    result = train(recipe, only=["b"], progress=False)
    assert weights_hash(root / "a") == before["a"]
    assert actions(result)["b"] in (KEEP, RETRAIN) and is_complete(root / "b")
    assert adapter_metadata(root / "b")["config"]["train"]["lr"] == 5e-3
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]  # nothing left behind
    tensors = load_file(root / "b" / "adapter_model.safetensors").values()
    assert torch.isfinite(torch.cat([t.flatten().float() for t in tensors])).all()


def test_the_train_command_says_what_it_did_to_each_adapter(tmp_path, tiny_model_dir, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from loraplex.cli import app

    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    recipe = make_recipe(tmp_path, tiny_model_dir)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    first = CliRunner().invoke(app, ["train", str(path)])
    assert first.exit_code == 0, first.output
    assert " ".join(first.output.split()).count("trained (new)") == 2
    recipe["datasets"][1]["train"] = {"lr": 5e-3}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    second = CliRunner().invoke(app, ["train", str(path), "--only", "b"])
    assert second.exit_code == 0, second.output
    said = " ".join(second.output.split())
    assert "b: retrained (train.lr 0.01 -> 0.005)" in said and "not named by --only" in said
