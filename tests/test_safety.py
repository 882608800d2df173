"""Safety: what loraplex loads and executes, where a recipe may write, and how a killed run resumes.

- weights only from safetensors (pickled .bin only with --allow-pickle), no remote code unless the recipe
  says so, YAML without object tags, chat templates in the sandbox;
- `run_name` and dataset names are names, not paths; `output_dir` may point anywhere;
- a run killed after a checkpoint, or while its adapter folder is written, resumes to the same adapter as
  an uninterrupted run, and nothing half-written (checkpoint, adapter, data cache, converted model) is ever
  taken for complete.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import make_tiny_model_dir, write_json, write_jsonl
from loraplex import cli, models
from loraplex.errors import ModelError, RecipeError
from loraplex.recipe import load_recipe

runner = CliRunner()
ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "amber", "pilot"] * 8]




def recipe_dict(tmp: Path, model_dir: Path, dtype: str = "float32", **train) -> dict:
    write_jsonl(tmp / "a.jsonl", ROWS)
    return {"model": {"path": str(model_dir), "dtype": dtype}, "output_dir": str(tmp / "runs"), "run_name": "t",
            "defaults": {"train": {"epochs": 4, "lr": 3e-2, "batch_size": 8, "save_steps": 4, "logging_steps": 1,
                                   **train}, "lora": {"r": 4, "alpha": 8}},
            "datasets": [{"name": "a", "path": str(tmp / "a.jsonl"), "target_modules": ["q_proj"]}]}


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- what is loaded


class _Stop(Exception):
    pass


@pytest.mark.parametrize("trust", [None, True], ids=["default", "recipe-sets-it"])
def test_weights_from_safetensors_and_remote_code_only_when_the_recipe_says(trust, tmp_path, tiny_model_dir,
                                                                           monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loraplex import train

    calls: dict[str, list[dict]] = {}

    def spy(name, original, stop=False):
        def wrapper(*args, **kwargs):
            calls.setdefault(name, []).append(kwargs)
            if stop:
                raise _Stop  # the weights are not needed: only the arguments are checked
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy("tokenizer", AutoTokenizer.from_pretrained))
    monkeypatch.setattr(AutoConfig, "from_pretrained", spy("config", AutoConfig.from_pretrained))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy("model", None, stop=True))
    raw = recipe_dict(tmp_path, tiny_model_dir, max_steps=1)
    if trust is not None:
        raw["model"]["trust_remote_code"] = trust
    with pytest.raises(_Stop):
        train(raw, progress=False)
    expected = bool(trust)
    assert calls["tokenizer"] and calls["config"]
    assert [kw.get("trust_remote_code") for kw in calls["tokenizer"] + calls["config"]] == \
           [expected] * (len(calls["tokenizer"]) + len(calls["config"]))
    (model_kwargs,) = calls["model"]
    assert model_kwargs["trust_remote_code"] is expected
    assert model_kwargs["use_safetensors"] is True


@pytest.fixture
def pickle_only_model(tmp_path, tiny_model_dir) -> Path:
    """The tiny model with its weights as pytorch_model.bin (a pickle) instead of model.safetensors."""
    folder = tmp_path / "pickled-llama"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def test_pickled_model_weights_are_refused_unless_allowed(pickle_only_model, tmp_path, tiny_model_dir, monkeypatch):
    raw = recipe_dict(tmp_path, pickle_only_model, max_steps=1)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    result = runner.invoke(cli.app, ["train", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert (f"error: {pickle_only_model} holds only pickled weights (pytorch_model.bin), which can run code when "
            "loaded; loraplex reads safetensors only. Save the model as safetensors, or pass --allow-pickle if you "
            "trust its source") in result.output

    monkeypatch.setattr(torch, "load", real_load)
    ref = models.resolve_base(str(pickle_only_model))
    allowed = models.load_model(ref, allow_pickle=True)  # transformers unpickles with weights_only=True
    plain = models.load_model(models.resolve_base(str(tiny_model_dir)))
    assert models.base_fingerprint(allowed) == models.base_fingerprint(plain)


def test_pickled_adapter_is_refused_unless_allowed(tmp_path, tiny_model_dir, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from loraplex import adapters

    peft_model = get_peft_model(models.load_model(models.resolve_base(str(tiny_model_dir))),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "adapter_model.bin").is_file()
    assert not (tmp_path / "pickled" / "adapter_model.safetensors").exists()
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    with pytest.raises(ModelError) as info:
        adapters.load(str(tiny_model_dir), {"zh": tmp_path / "pickled"}, dtype="float32")
    assert info.value.problems == [
        f"adapter 'zh': {tmp_path / 'pickled'} holds only adapter_model.bin, a pickle that can run code when loaded; "
        "loraplex reads adapter_model.safetensors only. Re-save the adapter as safetensors, or pass "
        "allow_pickle=True if you trust its source"]

    monkeypatch.setattr(torch, "load", real_load)
    loaded = adapters.load(str(tiny_model_dir), {"zh": tmp_path / "pickled"}, dtype="float32", allow_pickle=True)
    assert loaded.names == ["zh"]


def test_recipe_yaml_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\ndatasets: []\n', encoding="utf-8")
    result = runner.invoke(cli.app, ["prepare", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: {recipe}:1:8: malformed YAML (could not determine a constructor for the tag " in result.output
    assert not marker.exists()


def test_chat_template_runs_in_the_sandbox(tmp_path):
    marker = tmp_path / "pwned"
    escape = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    model_dir = make_tiny_model_dir(tmp_path / "evil-template", chat_template=escape)
    write_json(tmp_path / "d.json", [{"instruction": "q", "output": "a"}])
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"path": str(model_dir)},
                                                "datasets": [{"name": "d", "path": "d.json"}]})
    result = runner.invoke(cli.app, ["prepare", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert (f"  - {tmp_path / 'd.json'} row 1: the chat template refused this conversation (SecurityError: access "
            "to attribute '__init__' of 'type' object is unsafe); fix the row, or set template: chatml (or llama3) "
            "for this dataset") in result.output
    assert not marker.exists()


# --------------------------------------------------------------------------- where a recipe writes


@pytest.mark.parametrize("field, value", [
    ("run_name", "../x"), ("run_name", "a/b"), ("run_name", "/tmp/x"), ("run_name", ".."), ("run_name", "a\\b"),
    ("name", "a/b"), ("name", "../x"), ("name", ".."), ("name", ".hidden"),
])
def test_names_are_not_paths(field, value, tmp_path):
    write_json(tmp_path / "d.json", [{"instruction": "q", "output": "a"}])
    raw = {"datasets": [{"name": "d", "path": "d.json"}]}
    if field == "run_name":
        raw["run_name"] = value
    else:
        raw["datasets"][0]["name"] = value
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    where = "run_name" if field == "run_name" else f"datasets[{value}].name"
    expected = f"{where}: use letters, digits, '_', '.' or '-' (starting with a letter or digit) (got {value!r})"
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert expected in info.value.problems
    # an override on the command line cannot get around it either
    override = f"run_name={value}" if field == "run_name" else f"datasets.d.name={value}"
    result = runner.invoke(cli.app, ["prepare", str(write_recipe(tmp_path / "ok.yaml", {
        "datasets": [{"name": "d", "path": "d.json"}]})), override])
    assert result.exit_code == 2
    assert expected in result.output


def test_output_dir_is_the_users_choice_and_relative_to_the_recipe(tmp_path):
    (tmp_path / "project").mkdir()
    write_json(tmp_path / "project" / "d.json", [{"instruction": "q", "output": "a"}])
    entry = [{"name": "d", "path": "d.json"}]
    relative = load_recipe(write_recipe(tmp_path / "project" / "r.yaml", {"output_dir": "../elsewhere",
                                                                          "datasets": entry}))
    assert relative.run_dir().resolve() == tmp_path / "elsewhere" / "r"
    anywhere = load_recipe(write_recipe(tmp_path / "project" / "s.yaml", {"output_dir": str(tmp_path / "abs"),
                                                                          "datasets": entry}))
    assert anywhere.run_dir() == tmp_path / "abs" / "s"


# --------------------------------------------------------------------------- interruption and resume

KILL_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from kill_points import die, die_after_checkpoint
from loraplex.training import runner as run

recipe, point = json.loads(sys.argv[1]), sys.argv[2]
die_after_checkpoint(run, lambda step: point == f"checkpoint-{step}")
write_json = run.write_record


def write_json_or_die(path, data):
    if point == "adapter-write" and path.name == "loraplex.json" and path.parent.name.startswith("."):
        die()  # the PEFT files are in the temporary folder; the completeness marker is not
    write_json(path, data)


run.write_record = write_json_or_die
run.train(recipe, progress=False)
raise SystemExit("not killed")
"""
KILL_POINTS = ["checkpoint-4", "checkpoint-8", "adapter-write"]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])  # forced: the same on every CPU
def killed_runs(request, tmp_path_factory, tiny_model_dir):
    """The uninterrupted reference run, and one run killed at each point (the three in parallel)."""
    from loraplex import train

    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "LORAPLEX_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    recipes, procs = {}, {}
    for point in KILL_POINTS:
        recipes[point] = recipe_dict(tmp_path_factory.mktemp(point), tiny_model_dir, request.param, max_steps=24)
        procs[point] = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(recipes[point]), point],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reference_dir = tmp_path_factory.mktemp("reference")
    raw = recipe_dict(reference_dir, tiny_model_dir, request.param, max_steps=24)
    before = set(reference_dir.rglob("*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(home))
        reference = train(raw, progress=False)
    written = set(reference_dir.rglob("*")) - before
    for point, proc in procs.items():
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == -9, f"{point}: {err.decode()[-2000:]}"
    return reference, written, recipes


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapters" / "a" / "adapter_model.safetensors")


def test_a_run_writes_only_inside_its_run_folder(killed_runs):
    reference, written, _ = killed_runs
    assert written and all(path == reference.run_dir.parent or reference.run_dir in [path, *path.parents]
                           for path in written), sorted(written)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_resume_after_kill_matches_the_uninterrupted_run(point, killed_runs):
    from loraplex import train
    from loraplex.run import is_complete

    reference, _, recipes = killed_runs
    run_dir = Path(recipes[point]["output_dir"]) / "t"
    adapter_dir, checkpoints = run_dir / "adapters" / "a", run_dir / "checkpoints" / "a"
    assert not is_complete(adapter_dir)
    if point == "checkpoint-4":
        # a checkpoint folder cut short (no trainer_state.json, written last) must not be resumed from
        assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4", "fingerprint.json"]
        (checkpoints / "checkpoint-8").mkdir()
        shutil.copy(checkpoints / "checkpoint-4" / "adapter_model.safetensors", checkpoints / "checkpoint-8")
    elif point == "checkpoint-8":
        assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-8", "fingerprint.json"]  # limit 1
    else:
        # killed inside atomic_dir: the PEFT files sit in a temporary folder, the adapter name does not exist
        (tmp,) = [p for p in adapter_dir.parent.iterdir() if p.name.startswith(".a.") and p.name.endswith(".tmp")]
        assert not adapter_dir.exists() and (tmp / "adapter_model.safetensors").is_file()
        assert not (tmp / "loraplex.json").exists()
        # an adapter folder without its completeness marker (a copy cut short) is not taken as finished
        shutil.copytree(tmp, adapter_dir)
        save_file({k: torch.zeros_like(v) for k, v in load_file(tmp / "adapter_model.safetensors").items()},
                  adapter_dir / "adapter_model.safetensors")
        assert not is_complete(adapter_dir)

    resumed = train(recipes[point], resume=True, progress=False)
    assert is_complete(adapter_dir) and resumed.adapters["a"]["steps"] == 24
    assert not checkpoints.exists()
    ours, theirs = adapter_weights(run_dir), adapter_weights(reference.run_dir)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4)
    # what the summary and the report show covers the whole run, not only the part after the resume
    ours, theirs = resumed.adapters["a"], reference.adapters["a"]
    assert [p["step"] for p in ours["train_loss_curve"]] == [p["step"] for p in theirs["train_loss_curve"]]
    assert ours["train_loss_curve"][0]["step"] == 1 and len(ours["train_loss_curve"]) == 24
    torch.testing.assert_close(torch.tensor([p["loss"] for p in ours["train_loss_curve"]]),
                               torch.tensor([p["loss"] for p in theirs["train_loss_curve"]]), atol=1e-4, rtol=1e-4)
    assert ours["tokens_trained"] == theirs["tokens_trained"] > 0


def test_data_cache_without_its_marker_is_rebuilt(tmp_path, tiny_tokenizer):
    from loraplex.data import prepare

    recipe = load_recipe(recipe_dict(tmp_path, Path("unused")))
    spec = recipe.datasets[0]
    first = prepare.prepare_dataset(spec, recipe, tiny_tokenizer)
    cache, expected = first.cache_dir, first.train.to_list()
    # a cache folder cut short: no complete.json, a half-written split
    (cache / prepare.COMPLETE_MARKER).unlink()
    shutil.rmtree(cache / "train")
    (cache / "train").mkdir()
    (cache / "train" / "data-00000-of-00001.arrow").write_bytes(b"half")
    again = prepare.prepare_dataset(spec, recipe, tiny_tokenizer)
    assert again.cache_dir == cache and (cache / prepare.COMPLETE_MARKER).is_file()
    assert again.train.to_list() == expected
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]


def test_converted_model_without_its_marker_is_converted_again(tmp_path, monkeypatch):
    from loraplex.atomic import atomic_dir

    conversions = []

    def fake_convert(gguf_path, target):
        conversions.append(target)
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}", encoding="utf-8")
            (tmp / models.COMPLETE_MARKER).write_text("{}", encoding="utf-8")

    monkeypatch.setattr(models, "_convert_into", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = models.convert_gguf(gguf)
    assert models.convert_gguf(gguf) == target and len(conversions) == 1  # complete: reused
    (target / models.COMPLETE_MARKER).unlink()  # a folder cut short before its marker
    assert models.convert_gguf(gguf) == target and len(conversions) == 2
    assert (target / models.COMPLETE_MARKER).is_file()
