"""Experiment tracking and data from other tools, end to end: a run whose adapters train on ShareGPT rows, a parquet
file and a save_to_disk folder, evaluated and merged, read back with TensorBoard's event reader and an MLflow file
store client (no server, no network); W&B (offline) and trackio read back from their local files."""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from loraplex import train
from loraplex.errors import LoraplexError
from loraplex.evaluation import evaluate_run
from loraplex.merging import merge

WORDS = ["apple", "river", "stone", "cloud", "amber", "pilot"]


def sharegpt_rows(n: int) -> list[dict]:
    return [{"conversations": [{"from": "human", "value": f"Repeat {w}."}, {"from": "gpt", "value": f"{w} {w}"}]}
            for w in (WORDS * n)[:n]]


def messages_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say {w} once."}, {"role": "assistant", "content": w}]}
            for w in (WORDS * n)[:n]]


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Spell {w}.", "input": "", "output": "-".join(w)} for w in (WORDS * n)[:n]]


def write_sources(tmp: Path) -> dict[str, tuple[str, str]]:
    """(train, test) of each format."""
    import datasets

    write_jsonl(tmp / "chat.jsonl", sharegpt_rows(24))
    write_jsonl(tmp / "chat-test.jsonl", sharegpt_rows(2))
    datasets.Dataset.from_list(messages_rows(24)).to_parquet(str(tmp / "say.parquet"))
    datasets.Dataset.from_list(messages_rows(2)).to_parquet(str(tmp / "say-test.parquet"))
    datasets.Dataset.from_list(alpaca_rows(24)).save_to_disk(str(tmp / "spell"))
    datasets.Dataset.from_list(alpaca_rows(2)).save_to_disk(str(tmp / "spell-test"))
    return {"chat": ("chat.jsonl", "chat-test.jsonl"), "say": ("say.parquet", "say-test.parquet"),
            "spell": ("spell", "spell-test")}


def tracked_recipe(tmp: Path, model_dir: Path) -> dict:
    sources = write_sources(tmp)
    entries = [{"name": name, "path": str(tmp / train_file), "test_path": str(tmp / test_file),
                "target_modules": [module]}
               for (name, (train_file, test_file)), module in zip(sources.items(), ["q_proj", "v_proj", "o_proj"])]
    entries[2]["report_to"] = []  # per dataset: this one is not tracked
    return {"model": {"path": str(model_dir), "dtype": "float32"}, "output_dir": str(tmp / "runs"), "run_name": "t",
            "defaults": {"report_to": ["tensorboard", "mlflow"], "lora": {"r": 4, "alpha": 8},
                         "train": {"max_steps": 3, "lr": 3e-2, "batch_size": 4, "logging_steps": 1}},
            "datasets": entries}


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    os.environ["LORAPLEX_HOME"] = str(tmp / "home")
    result = train(tracked_recipe(tmp, tiny_model_dir), progress=False)
    evaluation = evaluate_run(result.run_dir, generation={"max_examples": 2, "max_new_tokens": 3})
    report = merge(result.run_dir, ["chat", "say"], out_dir=tmp / "merged-cs")
    return result, evaluation, report


def test_every_format_trains_and_evaluates(tracked):
    result, evaluation, _ = tracked
    assert list(result.adapters) == ["chat", "say", "spell"]
    for name in result.adapters:
        meta = result.adapters[name]
        assert meta["steps"] == 3 and meta["heldout_tokens"] > 0
        assert evaluation.metrics[name][name]["test_examples"] == 2
        assert evaluation.metrics[name][name]["exact_match"] is not None


def test_tensorboard_holds_one_run_per_tracked_adapter(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, evaluation, report = tracked
    root = result.run_dir / "tracking" / "tensorboard" / "t"
    assert sorted(p.name for p in root.iterdir()) == ["chat", "say"]  # spell has report_to: []
    for name in ("chat", "say"):  # the runs' ids, written through records (the eval and merge reopened them)
        saved = json.loads((result.run_dir / "tracking" / f"{name}.json").read_text(encoding="utf-8"))
        assert next(iter(saved)) == "schema" and saved["label"] == f"t/{name}" and "tensorboard" in saved
    for name in ("chat", "say"):
        events = EventAccumulator(str(root / name), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        scalars = events.Tags()["scalars"]
        loss = events.Scalars("train/loss")
        assert [e.step for e in loss] == [1, 2, 3]
        assert [e.value for e in loss] == pytest.approx([p["loss"] for p in result.adapters[name]["train_loss_curve"]])
        assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_s"} <= set(scalars)
        assert events.Scalars("heldout/loss")[-1].value == pytest.approx(result.adapters[name]["heldout_loss"])
        assert events.Scalars(f"eval/{name}/exact_match")[-1].value == \
            pytest.approx(evaluation.metrics[name][name]["exact_match"])
        kept = report.heldout["datasets"][name]["kept"]
        assert events.Scalars("merge/merged-cs/heldout_kept")[-1].value == pytest.approx(kept)
        recipe_entry = events.Tensors("recipe_entry/text_summary")[0].tensor_proto.string_val[0].decode()
        assert f"| name | {name} |" in recipe_entry and "| lora.r | 4 |" in recipe_entry


def test_mlflow_file_store_holds_one_run_per_tracked_adapter(tracked):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    result, evaluation, report = tracked
    client = MlflowClient((result.run_dir / "tracking" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("t")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["t/chat", "t/say"]
    for name in ("chat", "say"):
        run, meta = runs[f"t/{name}"], result.adapters[name]
        assert run.data.params["name"] == name and run.data.params["train.max_steps"] == "3"
        assert run.data.params["path"] == meta["config"]["path"]
        assert json.loads(run.data.params["target_modules"]) == meta["config"]["target_modules"]
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == [p["step"] for p in meta["train_loss_curve"]]
        assert [m.value for m in history] == pytest.approx([p["loss"] for p in meta["train_loss_curve"]])
        assert run.data.metrics["heldout/loss"] == pytest.approx(meta["heldout_loss"])
        assert run.data.metrics["heldout/loss_base"] == pytest.approx(meta["heldout_loss_base"])
        assert run.data.metrics["train/tokens_per_s"] == pytest.approx(meta["tokens_per_s"])
        assert run.data.metrics[f"eval/{name}/exact_match"] == \
            pytest.approx(evaluation.metrics[name][name]["exact_match"])
        assert run.data.metrics["merge/merged-cs/heldout_merged"] == \
            pytest.approx(report.heldout["datasets"][name]["merged"])


def test_a_missing_tracker_stops_the_run_before_training(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    from loraplex import tracking

    found = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else found(name))
    recipe = tracked_recipe(tmp_path, tiny_model_dir)
    with pytest.raises(LoraplexError) as info:
        train(recipe, progress=False)
    assert info.value.problems == [
        f"datasets[{name}].report_to: mlflow is not installed; pip install 'loraplex[tracking]' (or pip install "
        "mlflow), or remove it from report_to" for name in ("chat", "say")]
    assert not (tmp_path / "runs").exists()


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (.wandb): a 7-byte file header, then 32 KiB blocks of chunks, each
    with a 7-byte header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, offset = path.read_bytes(), [], b"", 7
    while offset + 7 <= len(data):
        if (offset % 32768) > 32768 - 7:
            offset += 32768 - offset % 32768  # block padding
            continue
        length, kind = struct.unpack("<HB", data[offset + 4:offset + 7])
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4) and pending:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch) -> Path:
    """W&B offline, console left alone; trackio's database in tmp_path (trackio binds TRACKIO_DIR at import)."""
    import trackio  # noqa: F401 - its modules must exist to be pointed elsewhere

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name, module in list(sys.modules.items()):
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    return tmp_path / "trackio"


def test_wandb_offline_and_trackio_runs_read_back(tmp_path, offline_trackers):
    from trackio.sqlite_storage import SQLiteStorage

    from loraplex.recipe import load_recipe
    from loraplex.tracking import finish_training, start_tracking

    write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(2))
    recipe = load_recipe({"run_name": "r", "datasets": [{"name": "d", "path": str(tmp_path / "d.jsonl"),
                                                         "report_to": ["wandb", "trackio"], "lora": {"r": 4}}]})
    tracking = start_tracking(tmp_path / "run", "r", recipe.datasets[0], resume=False)
    for step, loss in [(1, 2.5), (2, 1.5)]:
        tracking.log_metrics({"train/loss": loss}, step)
    finish_training(tracking, {"steps": 2, "heldout_loss": 0.75})

    record = json.loads((tmp_path / "run" / "tracking" / "d.json").read_text())
    [log] = (tmp_path / "run" / "tracking" / "wandb").glob(f"offline-run-*-{record['wandb']['id']}/*.wandb")
    records = wandb_records(log)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "r/d" and run.project == "r"
    history = [{item.key or item.nested_key[0]: json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["step"], h["train/loss"]) for h in history if "train/loss" in h] == [(1, 2.5), (2, 1.5)]
    assert [h["heldout/loss"] for h in history if "heldout/loss" in h] == [0.75]
    config = [json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update if item.key == "lora.r"]
    assert config == ["4"]
    logs = SQLiteStorage.get_logs("r", "r/d")
    assert [(entry["step"], entry["train/loss"]) for entry in logs if "train/loss" in entry] == [(1, 2.5), (2, 1.5)]
    assert [entry["heldout/loss"] for entry in logs if "heldout/loss" in entry] == [0.75]
    assert offline_trackers.is_dir()


def test_selection_figures_and_an_untracked_retrain(tmp_path):
    from loraplex.recipe import load_recipe
    from loraplex.tracking import adapter_figures, reopen, start_tracking

    meta = {"steps": 5, "heldout_loss": 1.25, "heldout_loss_base": 2.0, "tokens_per_s": 90.0,
            "selection": {"seconds": 3.5, "budget": 4096, "r": 8, "candidates": [{}, {}, {}], "probe": {"tokens": 640}}}
    figures = adapter_figures(meta)
    keys = ("heldout/loss", "heldout/loss_base", "train/tokens_per_s", "selection/seconds", "selection/budget",
            "selection/rank", "selection/candidates", "selection/probe_tokens")
    assert {key: figures[key] for key in keys} == \
        {"heldout/loss": 1.25, "heldout/loss_base": 2.0, "train/tokens_per_s": 90.0, "selection/seconds": 3.5,
         "selection/budget": 4096, "selection/rank": 8, "selection/candidates": 3, "selection/probe_tokens": 640}
    write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(2))
    entry = {"name": "d", "path": str(tmp_path / "d.jsonl")}
    tracked = load_recipe({"datasets": [{**entry, "report_to": ["tensorboard"]}]}).datasets[0]
    start_tracking(tmp_path / "run", "r", tracked, resume=False).close(step=1)
    assert reopen(tmp_path / "run", "d").label == "r/d"
    untracked = load_recipe({"datasets": [entry]}).datasets[0]
    assert start_tracking(tmp_path / "run", "r", untracked, resume=False) is None
    assert reopen(tmp_path / "run", "d") is None  # eval and merge figures of the new adapter go to no old run
