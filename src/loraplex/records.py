"""The run folder's JSON records, typed and versioned, written and read only here: run.json (`RunRecord`), each
adapter's loraplex.json (`AdapterRecord`), eval.json (`EvalRecord`), a merged model's merge_report.json
(`MergeRecord`), an adapter's tracked runs in tracking/<adapter>.json (`TrackingRecord`) and a `target_modules:
auto` decision in the selection cache (`SelectionRecord`).

`write_record` validates a record and writes it with `"schema": SCHEMA` first; `read_record` refuses a file of a
newer schema, validates the rest and returns the model. A file without `schema` (written before records were
versioned) is read as schema 1. Fields a record does not declare are kept as written (`extra="allow"`), so a file
round-trips unchanged; `as_dict` gives the record as its file holds it, for code that reads it by key.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .atomic import atomic_write_json
from .errors import LoraplexError

SCHEMA = 1


class RecordError(LoraplexError):
    """A record file is unreadable, of another shape, or of a newer schema than this loraplex reads."""


class Record(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_version: int = Field(SCHEMA, alias="schema", description="the record's layout version")

    def as_dict(self) -> dict[str, Any]:
        """The record as its file holds it, without `schema`."""
        data = self.model_dump(exclude_unset=True, by_alias=True)
        data.pop("schema", None)
        return data


class RunRecord(Record):
    """run.json: which recipe the run folder belongs to."""

    recipe_fingerprint: str
    base_model: str


class AdapterRecord(Record):
    """loraplex.json beside an adapter's PEFT files (only `name` is required: an adapter saved by other code with a
    loraplex.json naming its base loads too)."""

    name: str
    base_model: Optional[str] = None
    base_model_location: Optional[str] = None
    base_fingerprint: Optional[str] = None
    dtype: Optional[str] = Field(None, description="the dtype its base weights were held in while it trained")
    config: Optional[dict[str, Any]] = Field(None, description="the recipe entry it trained with")
    fingerprint: Optional[str] = Field(None, description="what decided its weights (`training.plan`)")
    fingerprint_parts: Optional[dict[str, Any]] = None
    trainable_params: Optional[int] = None
    total_params: Optional[int] = None
    steps: Optional[int] = None
    heldout_loss: Optional[float] = None
    heldout_loss_base: Optional[float] = None
    train_loss_curve: Optional[list[dict[str, Any]]] = None
    selection: Optional[dict[str, Any]] = Field(None, description="the `target_modules: auto` decision")
    compose_with: Optional[dict[str, str]] = Field(None, description="name -> weights hash of each composed adapter")


class EvalRecord(Record):
    """eval.json, what `loraplex.evaluate` returns: the eval matrix (rows = models, columns = datasets)."""

    run: str
    base_model: str
    rows: list[dict[str, Any]] = Field(description="each model: name, kind (base, adapter, merged), path")
    columns: list[dict[str, Any]] = Field(description="each dataset: name, held-out and test examples")
    metrics: dict[str, dict[str, dict[str, Any]]] = Field(description="row name -> dataset -> loss, perplexity, "
                                                                      "token accuracy, exact match, chrF")
    samples: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    routing: Optional[dict[str, Any]] = Field(None, description="how often `model: auto` routes right")
    base_precision: Optional[str] = None
    base_loaded_as: Optional[str] = None
    trained_on: Optional[str] = None
    generation: Optional[dict[str, Any]] = None
    wall_time_s: Optional[float] = None


class MergeAdapter(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    weight: Optional[float] = None
    weights_sha256: Optional[str] = Field(None, description="the adapter's weights when it was merged")


class MergeRecord(Record):
    """merge_report.json in a merged model folder, what `loraplex.merge` returns: what was merged, how, and its
    verification."""

    run_dir: str
    adapters: list[MergeAdapter]
    method: Optional[str] = None
    exact: Optional[bool] = Field(None, description="the saved weights are the formula's exact sum")
    method_note: Optional[str] = None
    verification: dict[str, Any] = Field(default_factory=dict, description="weights: the saved weights against the "
                                         "formula; logits: the saved model against base+adapters")
    heldout: Optional[dict[str, Any]] = Field(None, description="per adapter, how much of its held-out loss "
                                                                "improvement the merged model keeps")
    weights_search: Optional[dict[str, Any]] = None
    out_dir: Optional[str] = None


class SelectionRecord(Record):
    """A `target_modules: auto` decision, cached under $LORAPLEX_HOME/selections/<cache_key>.json; `loraplex.select`
    returns one per dataset, with `cached` and `recipe_target_modules` (which the cache does not hold) set."""

    winner: str = Field(description="the chosen candidate's label, e.g. q_proj+v_proj")
    cache_key: str
    composed_with: dict[str, str] = Field(default_factory=dict)
    r: Optional[int] = None
    alpha: Optional[int | float] = None  # as the recipe wrote it (an int stays an int)
    budget: Optional[int] = Field(None, description="trainable parameters every candidate is matched to")
    decided_by: Optional[str] = None
    candidates: Optional[list[dict[str, Any]]] = None
    seconds: Optional[float] = None
    cached: Optional[bool] = Field(None, description="answered from the cache")
    recipe_target_modules: Optional[Any] = Field(None, description="what the recipe names (`auto` or modules)")


class TrackingRecord(Record):
    """tracking/<adapter>.json: the adapter's runs in its trackers (`report_to`), what reopens them to add figures."""

    label: str = Field(description="<run_name>/<adapter>, the runs' name")
    step: int = Field(0, description="the adapter's last training step, where later figures are logged")
    tensorboard: Optional[dict[str, Any]] = Field(None, description="logdir")
    mlflow: Optional[dict[str, Any]] = Field(None, description="uri, run_id")
    wandb: Optional[dict[str, Any]] = Field(None, description="id")
    trackio: Optional[dict[str, Any]] = Field(None, description="project, name")


R = TypeVar("R", bound=Record)


def write_record(path: str | Path, record: Record) -> None:
    """Write `record` atomically, `schema` first."""
    atomic_write_json(Path(path), {"schema": SCHEMA, **record.as_dict()})


def read_record(path: str | Path, kind: type[R]) -> R:
    """The record in `path`, validated as `kind`; RecordError names the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise RecordError(f"{path} is unreadable ({exc}); the file is damaged") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path} holds a JSON {type(data).__name__}, not the object loraplex writes there")
    version = data.get("schema", SCHEMA)
    if not isinstance(version, int) or version > SCHEMA:
        raise RecordError(f"{path} has schema {version!r}, newer than this loraplex reads ({SCHEMA}); "
                          "upgrade loraplex to read it")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        where = ".".join(str(part) for part in exc.errors()[0]["loc"])
        raise RecordError(f"{path}: {where}: {exc.errors()[0]['msg'].lower()}; the file is not a {kind.__name__} "
                          "this loraplex wrote") from None
