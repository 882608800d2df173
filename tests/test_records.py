"""The run folder's typed records: files written before records were versioned (tests/fixtures/records_v0, made by
`train`, `merge`, `evaluate_run` and a `target_modules: auto` decision of that code, and a tracked adapter's
tracking/<name>.json) load unchanged; written back
they start with `schema: 1`; a newer schema, a damaged file or a missing field is refused with the file named."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loraplex.records import (SCHEMA, AdapterRecord, EvalRecord, MergeRecord, RecordError, RunRecord,
                              SelectionRecord, TrackingRecord, read_record, write_record)

FIXTURES = Path(__file__).parent / "fixtures" / "records_v0"
KINDS = {"run.json": RunRecord, "loraplex_a.json": AdapterRecord, "loraplex_b_auto.json": AdapterRecord,
         "eval.json": EvalRecord, "merge_report.json": MergeRecord, "selection.json": SelectionRecord,
         "tracking.json": TrackingRecord}


def same(a, b) -> bool:
    """Equal, NaN equal to NaN (held-out losses may be NaN)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_a_file_without_schema_loads_and_round_trips(name, tmp_path):
    written = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    assert "schema" not in written
    record = read_record(FIXTURES / name, KINDS[name])
    assert record.schema_version == 1 and same(record.as_dict(), written)
    write_record(tmp_path / name, record)
    again = json.loads((tmp_path / name).read_text(encoding="utf-8"))
    assert next(iter(again)) == "schema" and again["schema"] == SCHEMA
    assert same({k: v for k, v in again.items() if k != "schema"}, written)
    assert same(read_record(tmp_path / name, KINDS[name]).as_dict(), written)


def test_typed_fields_read_as_declared():
    adapter = read_record(FIXTURES / "loraplex_b_auto.json", AdapterRecord)
    assert adapter.name == "b" and adapter.selection["winner"] and adapter.trainable_params > 0
    merge = read_record(FIXTURES / "merge_report.json", MergeRecord)
    assert [a.name for a in merge.adapters] == ["a", "b"] and all(len(a.weights_sha256) > 8 for a in merge.adapters)
    evaluation = read_record(FIXTURES / "eval.json", EvalRecord)
    assert set(evaluation.metrics) == {r["name"] for r in evaluation.rows}
    tracking = read_record(FIXTURES / "tracking.json", TrackingRecord)
    assert (tracking.label, tracking.step, tracking.wandb) == ("t/chat", 4, None)
    assert tracking.mlflow["run_id"] == "5f1c2a7d9e8b4c3a"


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"schema": SCHEMA + 1, "recipe_fingerprint": "x", "base_model": "y"}), encoding="utf-8")
    with pytest.raises(RecordError, match=r"run\.json has schema 2, newer than this loraplex reads \(1\); upgrade"):
        read_record(path, RunRecord)


@pytest.mark.parametrize("text,message", [("{half", "is unreadable"), ("[]", "holds a JSON list"),
                                          ('{"run": "r", "base_model": "m", "rows": [], "columns": []}', "metrics: ")])
def test_a_damaged_or_foreign_file_is_named(text, message, tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecordError) as err:
        read_record(path, EvalRecord)
    assert str(path) in str(err.value) and message in str(err.value)


def test_writing_validates(tmp_path):
    with pytest.raises(ValueError):
        write_record(tmp_path / "loraplex.json", AdapterRecord.model_validate({"name": "a", "steps": "many"}))
    assert not (tmp_path / "loraplex.json").exists()
