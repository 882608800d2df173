"""Experiment tracking: one tracked run per adapter, in each tracker its recipe entry's `report_to` names.

The run is named `<run_name>/<dataset>`; its parameters are the adapter's resolved recipe entry (flattened: `lora.r`,
`train.lr`...); its metrics are the training log (`train/loss`, `train/learning_rate`, `train/grad_norm`,
`train/tokens_per_s`), the figures of the trained adapter (`heldout/...`, `selection/...`), and later those of
`loraplex eval` (`eval/<dataset>/...`) and `loraplex merge` (`merge/<merged folder>/...`), which reopen the same runs.

Where each tracker writes, unless its own environment variables say otherwise:
- tensorboard: `<run folder>/tracking/tensorboard/<run_name>/<dataset>` (event files)
- mlflow: MLFLOW_TRACKING_URI, else the file store `<run folder>/tracking/mlruns`; experiment `<run_name>`
- wandb: project WANDB_PROJECT or `<run_name>`, local files in `<run folder>/tracking/wandb` (WANDB_MODE=offline
  keeps them there)
- trackio: project `<run_name>`, trackio's own local database (TRACKIO_DIR)

`<run folder>/tracking/<dataset>.json` records each adapter's runs (ids, folders), so eval and merge log to them.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from .errors import LoraplexError
from .recipe import DatasetSpec
from .records import TrackingRecord, read_record, write_record
from .run import tracking_dir

MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
TRAINER_LOGS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}


def check_trackers(specs: list[DatasetSpec]) -> None:
    """Refuse, before any work, a tracker some entry's report_to asks for and this environment lacks."""
    problems = [f"datasets[{spec.name}].report_to: {tracker} is not installed; pip install 'loraplex[tracking]' "
                f"(or pip install {MODULES[tracker]}), or remove it from report_to"
                for spec in specs for tracker in spec.report_to if importlib.util.find_spec(MODULES[tracker]) is None]
    if problems:
        raise LoraplexError(problems, title="experiment tracking is not available")


def flatten(entry: dict, prefix: str = "") -> dict[str, str]:
    """{"lora": {"r": 8}} -> {"lora.r": "8"}; lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


class _TensorBoard:
    def __init__(self, folder: Path, label: str, record: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.record = {"logdir": record.get("logdir") or str(folder / "tensorboard" / label)}
        self.writer = SummaryWriter(self.record["logdir"])

    def log_params(self, params: dict[str, str]) -> None:
        table = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("recipe_entry", "| parameter | value |\n| --- | --- |\n" + table)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, folder: Path, label: str, record: dict):
        from mlflow.tracking import MlflowClient

        uri = record.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or (folder / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 asks for this to use a file store (no server, no database)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        run_id = record.get("run_id")
        if run_id is None:
            name = label.split("/")[0]
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=label).info.run_id
        self.record = {"uri": uri, "run_id": run_id}

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value[:6000]) for key, value in params.items()]  # MLflow's limit on a value's length
        for start in range(0, len(items), 100):  # and on a batch's parameters
            self.client.log_batch(self.record["run_id"], params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.record["run_id"], metrics=[Metric(key, value, now, step)
                                                             for key, value in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.record["run_id"])


class _WandB:
    def __init__(self, folder: Path, label: str, record: dict):
        import wandb

        run_id = record.get("id") or uuid.uuid4().hex[:8]
        (folder / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or label.split("/")[0], name=label, id=run_id,
                              resume="allow", dir=str(folder), reinit="create_new")
        self.record = {"id": run_id}

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})  # wandb's own step only grows: a reopened run continues it

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, folder: Path, label: str, record: dict):
        import trackio

        self.run = trackio.init(project=label.split("/")[0], name=label, resume="allow", embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)
        self.record = {"project": label.split("/")[0], "name": label}

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB, "trackio": _Trackio}


class AdapterTracking:
    """One adapter's runs in its trackers; `record` (saved in tracking/<name>.json) reopens them."""

    def __init__(self, run_dir: Path, name: str, label: str, trackers: list[str], records: dict | None = None):
        self.path = tracking_dir(run_dir) / f"{name}.json"
        self.label, self.step = label, (records or {}).get("step", 0)
        folder = tracking_dir(run_dir)
        self.backends = {t: BACKENDS[t](folder, label, (records or {}).get(t, {})) for t in trackers}
        self.save()

    def save(self) -> None:
        write_record(self.path, TrackingRecord.model_validate({"label": self.label, "step": self.step,
                                                               **{t: b.record for t, b in self.backends.items()}}))

    def log_params(self, params: dict[str, str]) -> None:
        for backend in self.backends.values():
            backend.log_params(params)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Numbers only (None, NaN and text are left out); at the adapter's last training step by default."""
        numbers = {key: float(v) for key, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        if numbers:
            for backend in self.backends.values():
                backend.log_metrics(numbers, self.step if step is None else step)

    def close(self, step: int | None = None) -> None:
        if step is not None:
            self.step = step
            self.save()
        for backend in self.backends.values():
            backend.close()

    def callback(self, tokens_per_s: Callable[[], float]) -> TrainerCallback:
        return _TrainingLog(self, tokens_per_s)


class _TrainingLog(TrainerCallback):
    """The Trainer's log (loss, learning rate, grad norm) and tokens/s, at each logging step."""

    def __init__(self, tracking: AdapterTracking, tokens_per_s: Callable[[], float]):
        self.tracking, self.tokens_per_s = tracking, tokens_per_s

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {TRAINER_LOGS[key]: value for key, value in (logs or {}).items() if key in TRAINER_LOGS}
        if metrics:
            self.tracking.log_metrics({**metrics, "train/tokens_per_s": self.tokens_per_s()}, state.global_step)


def start_tracking(run_dir: Path, run_name: str, spec: DatasetSpec, resume: bool) -> AdapterTracking | None:
    """New runs for an adapter about to train (those recorded, when resuming from its checkpoint); None without
    report_to. Logs the entry as parameters."""
    path = tracking_dir(run_dir) / f"{spec.name}.json"
    if not spec.report_to:
        path.unlink(missing_ok=True)  # the runs of an adapter this one replaces get no figures of it
        return None
    records = read_record(path, TrackingRecord).as_dict() if resume and path.is_file() else None
    tracking = AdapterTracking(run_dir, spec.name, f"{run_name}/{spec.name}", list(spec.report_to), records)
    tracking.log_params(flatten(spec.model_dump(mode="json")))
    return tracking


def finish_training(tracking: AdapterTracking | None, meta: dict) -> None:
    """The trained adapter's figures, at its last step; the runs are closed (eval and merge reopen them)."""
    if tracking:
        tracking.log_metrics(adapter_figures(meta), meta["steps"])
        tracking.close(step=meta["steps"])


def adapter_figures(meta: dict) -> dict[str, Any]:
    """The trained adapter's figures from its loraplex.json: held-out loss and accuracy, speed, module selection."""
    figures = {f"heldout/{key[len('heldout_'):]}": meta.get(key) for key in meta if key.startswith("heldout_")}
    figures.update({"train/tokens_per_s": meta.get("tokens_per_s"), "train/wall_time_s": meta.get("wall_time_s"),
                    "train/tokens": meta.get("tokens_trained"), "trainable_params": meta.get("trainable_params")})
    selection = meta.get("selection") or {}
    figures.update({"selection/seconds": selection.get("seconds"), "selection/budget": selection.get("budget"),
                    "selection/rank": selection.get("r"), "selection/candidates": len(selection.get("candidates", [])),
                    "selection/probe_tokens": (selection.get("probe") or {}).get("tokens")})
    return figures


def reopen(run_dir: Path, name: str) -> AdapterTracking | None:
    """The tracked runs of a trained adapter (None when it was trained without report_to)."""
    path = tracking_dir(run_dir) / f"{name}.json"
    if not path.is_file():
        return None
    records = read_record(path, TrackingRecord).as_dict()
    trackers = [t for t in BACKENDS if t in records]
    missing = [t for t in trackers if importlib.util.find_spec(MODULES[t]) is None]
    if missing:
        raise LoraplexError(f"{path}: adapter '{name}' reports to {', '.join(missing)}, which is not installed here; "
                            "pip install 'loraplex[tracking]' to log its eval and merge figures too")
    return AdapterTracking(run_dir, name, records["label"], trackers, records)


def log_eval(run_dir: Path, result: dict) -> None:
    """Each tracked adapter's row of the eval matrix: `eval/<dataset>/<metric>`."""
    for row in result["rows"]:
        tracking = reopen(run_dir, row["name"]) if row["kind"] == "adapter" else None
        if tracking:
            cells = result["metrics"][row["name"]]
            tracking.log_metrics({f"eval/{column}/{key}": value for column, cell in cells.items()
                                  for key, value in cell.items()})
            tracking.close()


def log_merge(run_dir: Path, merged_name: str, report: dict) -> None:
    """For each tracked adapter of a merge: its weight, and the held-out losses and share of its gain the merged
    model keeps, as `merge/<merged folder>/...`."""
    prefix = "merge/" + re.sub(r"[^\w.-]", "_", merged_name)
    logits = report["verification"]["logits"]["max_abs_diff"]
    for entry in report["adapters"]:
        tracking = reopen(run_dir, entry["name"])
        if tracking:
            heldout = report.get("heldout", {}).get("datasets", {}).get(entry["name"], {})
            tracking.log_metrics({f"{prefix}/weight": entry.get("weight"), f"{prefix}/logits_max_abs_diff": logits,
                                  **{f"{prefix}/heldout_{key}": heldout.get(key)
                                     for key in ("base", "adapter", "merged", "kept")}})
            tracking.close()
