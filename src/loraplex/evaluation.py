"""Evaluation: held-out metrics on answer tokens, greedy generation metrics, and the run's eval matrix.

Training reports its held-out loss through `lm.packed.heldout_metrics`, so the evaluation matrix's diagonal
equals the numbers recorded at training time.

`evaluate_run` builds the matrix: rows are the base, each trained adapter and any merged model folders;
columns are the recipe's datasets. Each cell holds the held-out loss, perplexity and token accuracy,
and, where the dataset has a test split, exact match and chrF of greedy answers. The base is loaded
once and the adapters are switched on it; two columns over the same data are computed once per row.
The base is loaded in full precision, QLoRA runs included (their adapters are ordinary LoRA weights);
`base_precision="quantized"` loads it as the recipe's `model.quantization` instead. eval.json says which.
A merge whose weights were searched on the even rows of held-out splits (`--method weights-search`) is scored on
the odd rows of those splits only, beside the merge report's base and adapter losses on the same rows.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .adapters import load
from .checkers import ANSWER_CHECKERS, same_text
from .data.formats import BadRow, detect_format, iter_raw_rows, to_messages
from .data.prepare import graded_rows
from .data.render import chat_template_for, end_of_turn_ids, prompt_text
from .device import to_accelerator
from .errors import DataError, LoraplexError
from .models import load_model, resolve_base, stop_token_ids
from .quantize import is_quantized
from .records import EvalRecord, MergeRecord, RecordError, read_record, write_record
from .routing import Router, mean_hidden_state, measured_rows
from .run import (EVAL_FILE, MERGE_REPORT, adapter_dir, adapter_metadata, is_complete, merged_from, open_run,
                  weights_hash,
                  writer_lock)
from .lm.packed import heldout_metrics
from .tracking import log_eval


# (reference, prediction) -> correct. The reference is whatever the caller lists as references:
# the expected answer strings by default, the raw test rows for a task checker that reads them.
Checker = Callable[[Any, str], bool]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             stop_ids: set[int] = frozenset()) -> list[str]:
    """Greedy continuations of rendered prompts, batched with left padding; each ends at an eos of the model or
    at one of `stop_ids` (the end-of-turn tokens the adapters were trained to write)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    eos = sorted(stop_token_ids(model, tokenizer) | set(stop_ids))
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                 temperature=None, top_p=None, top_k=None)
            new = ids[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [o.strip() for o in outputs]


def exact_match(predictions: list[str], references: list, checker: Checker | None = None) -> float:
    """Share of predictions that `checker(reference, prediction)` accepts (default: `same_text`)."""
    if not references:
        return float("nan")
    check = checker or same_text
    return sum(bool(check(r, p)) for p, r in zip(predictions, references)) / len(references)


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (0-100, sacrebleu's defaults): character n-gram F-score, fair to CJK text."""
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        raise LoraplexError("chrF needs sacrebleu: pip install 'loraplex[report]'") from None
    if not references:
        return float("nan")
    return float(CHRF().corpus_score(predictions, [references]).score)


# --------------------------------------------------------------------------- test splits


@dataclass
class TestSplit:
    """A dataset's test rows, ready for generation."""

    prompts: list[str] = field(default_factory=list)  # rendered with the chat template, up to the answer
    questions: list[str] = field(default_factory=list)  # the last user message, for reports
    references: list[str] = field(default_factory=list)  # the expected answers
    rows: list[Any] = field(default_factory=list)  # the raw rows, for task checkers

    __test__ = False  # not a pytest class


def load_test_split(spec, recipe, tokenizer, limit: int | None = None) -> TestSplit:
    """The first `limit` rows of the dataset's test file(s); bad rows follow the dataset's on_bad_rows."""
    template = chat_template_for(tokenizer, spec.template)
    split, bad = TestSplit(), []
    for file in spec.files("test_path"):
        for raw in iter_raw_rows(recipe.resolve(file)):
            if limit is not None and len(split.rows) >= limit:
                break
            if isinstance(raw, BadRow):
                bad.append(str(raw))
                continue
            fmt = spec.format if spec.format != "auto" else detect_format(raw.value, spec.columns) or "alpaca"
            try:
                messages = to_messages(raw.value, fmt, spec.columns, spec.system)
            except ValueError as exc:
                bad.append(f"{raw.file} {raw.where}: {exc}")
                continue
            user = [m["content"] for m in messages[:-1] if m["role"] == "user"]
            split.prompts.append(prompt_text(tokenizer, messages, template))
            split.questions.append(user[-1] if user else "")
            split.references.append(messages[-1]["content"])
            split.rows.append(raw.value)
    if bad and spec.on_bad_rows == "error":
        raise DataError(bad + [f"fix these rows, or set on_bad_rows: skip for dataset '{spec.name}'"],
                        title=f"dataset '{spec.name}': {len(bad)} bad test row(s)")
    return split


# --------------------------------------------------------------------------- the run's matrix


@dataclass
class GenerationSettings:
    """Greedy generation on each dataset's test split."""

    enabled: bool = True
    max_new_tokens: int = 32
    batch_size: int = 16
    max_examples: int | None = 200  # the first test rows per dataset (None: all)
    samples: int = 3  # generations per dataset kept in eval.json for the report
    cross: bool = True  # also generate with each adapter on the other datasets' test splits


@dataclass
class _Column:
    name: str
    heldout: Any  # datasets.Dataset | None
    test: TestSplit | None
    checker: Checker
    reads_rows: bool  # a checker passed to evaluate_run reads the raw test rows, a recipe's the expected answers
    checker_text: str
    heldout_key: str
    test_key: str


class _MatrixBuilder:
    """Computes one row of the matrix per model; columns over identical data share their results."""

    def __init__(self, columns: list[_Column], tokenizer, settings: GenerationSettings, stop_ids: set[int]):
        self.columns, self.tokenizer, self.settings, self.stop_ids = columns, tokenizer, settings, stop_ids
        self.metrics: dict[str, dict[str, dict]] = {}
        self.samples: dict[str, dict[str, list[str]]] = {}  # row -> column -> first predictions

    def add_row(self, label: str, model, own: str | None = None, unseen: dict[str, dict] | None = None) -> None:
        """`own`: the adapter's dataset; without `settings.cross` it generates only on that test split.
        `unseen`: column -> {"rows": held-out rows to score instead of the whole split, "note", ...} (for a model
        whose weights were chosen on the other rows); the rest of the entry is kept in the cell."""
        own_keys = {c.test_key for c in self.columns if c.name == own}
        heldout: dict[str, dict] = {}
        predictions: dict[str, list[str]] = {}
        row, kept = {}, {}
        for col in self.columns:
            restricted = (unseen or {}).get(col.name)
            key = (col.heldout_key, bool(restricted))
            if key not in heldout:
                heldout[key] = heldout_metrics(model, restricted["rows"] if restricted else col.heldout)
            cell = dict(heldout[key])
            if restricted:
                cell.update({k: v for k, v in restricted.items() if k != "rows"},
                            heldout_examples=len(restricted["rows"]))
            generates = self.settings.cross or own is None or col.test_key in own_keys
            if col.test is not None and col.test.prompts and generates:
                if col.test_key not in predictions:
                    predictions[col.test_key] = generate(model, self.tokenizer, col.test.prompts,
                                                         self.settings.max_new_tokens, self.settings.batch_size,
                                                         self.stop_ids)
                answers = predictions[col.test_key]
                references = col.test.rows if col.reads_rows else col.test.references
                cell.update(exact_match=exact_match(answers, references, col.checker),
                            chrf=chrf(answers, col.test.references), test_examples=len(answers))
                kept[col.name] = answers[:self.settings.samples]
            row[col.name] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in cell.items()}
        self.metrics[label], self.samples[label] = row, kept

    def sample_table(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for col in self.columns:
            if col.test is None or not col.test.prompts:
                continue
            n = min(self.settings.samples, len(col.test.prompts))
            out[col.name] = [{"question": col.test.questions[i], "reference": col.test.references[i],
                              "outputs": {label: kept[col.name][i] for label, kept in self.samples.items()
                                          if col.name in kept}}
                             for i in range(n)]
        return out


def _content_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _to_accelerator(model):
    return model if is_quantized(model) else to_accelerator(model)  # bitsandbytes models refuse .to()


BASE_PRECISIONS = ("full", "quantized")


def evaluate_run(run_dir: str | Path, merged: tuple | list = (), generation: GenerationSettings | dict | None = None,
                 checkers: dict[str, Checker] | None = None, log: Callable[[str], None] | None = None,
                 base_precision: str = "full") -> EvalRecord:
    """The eval matrix of a run, saved as eval.json and returned as its record (one writer at a time: see
    `_evaluate_matrix` for the parameters)."""
    with writer_lock(run_dir, ["eval"], "loraplex eval"):
        return EvalRecord.model_validate(_evaluate_matrix(run_dir, merged, generation, checkers, log, base_precision))


def _column_record(column) -> dict:
    return {"name": column.name, "heldout_examples": len(column.heldout) if column.heldout is not None else 0,
            "test_examples": len(column.test.prompts) if column.test else 0, "exact_match": column.checker_text}


def _evaluate_matrix(run_dir: str | Path, merged: tuple | list = (),
                     generation: GenerationSettings | dict | None = None,
                     checkers: dict[str, Checker] | None = None, log: Callable[[str], None] | None = None,
                     base_precision: str = "full") -> dict:
    """The eval matrix of a run: (base, each adapter, each merged folder) x (each dataset); saved as eval.json.

    `checkers` maps dataset names to task checkers for exact match, each called as (raw test row, answer); other
    datasets use the recipe's `checker` (`loraplex.checkers`: stripped string equality unless it names another).
    `base_precision`: "full" (default) loads the base in full precision for the base and adapter rows, "quantized"
    as the recipe's `model.quantization` (merged folders are always full precision).
    """
    run_dir, log = Path(run_dir), log or (lambda message: None)
    settings = generation if isinstance(generation, GenerationSettings) else GenerationSettings(**(generation or {}))
    ws = open_run(run_dir)
    adapter_dirs = {s.name: adapter_dir(run_dir, s.name) for s in ws.recipe.datasets
                    if is_complete(adapter_dir(run_dir, s.name))}
    if not adapter_dirs:
        raise LoraplexError(f"{run_dir} holds no trained adapter; run `loraplex train` first")
    merged_refs = [resolve_base(str(Path(m).resolve())) for m in merged]  # a bad folder fails before any work
    started = time.perf_counter()
    prepared = ws.prepare()
    builder = _MatrixBuilder(_columns(ws, prepared, settings, checkers or {}),
                             ws.tokenizer, settings, _end_of_turn_ids(ws))
    base_row = "base" if "base" not in adapter_dirs else "base model"
    rows = [{"name": base_row, "kind": "base"}]
    adapter_set = load(ws.base, adapter_dirs, dtype=ws.dtype,
                       quantization=_quantization(ws.recipe.model, base_precision))
    precision = adapter_set.base_precision
    _to_accelerator(adapter_set.model)
    for name in [None, *adapter_dirs]:
        log(f"evaluating {name or base_row}")
        builder.add_row(name or base_row, adapter_set.use(name).model, own=name)
        if name:
            rows.append({"name": name, "kind": "adapter", "dataset": name, "path": str(adapter_dirs[name]),
                         "adapter_weights": {name: weights_hash(adapter_dirs[name])}})
    log("routing held-out prompts (model: auto)")
    routing = routing_report(adapter_set.use(None).model, ws, prepared, adapter_dirs)
    del adapter_set
    for i, ref in enumerate(merged_refs):
        label = f"merged:{Path(ref.location).name}"
        label = label if label not in builder.metrics else f"{label}#{i + 1}"  # two folders of one name
        log(f"evaluating {label}")
        builder.add_row(label, _to_accelerator(load_model(ref, ws.dtype)),
                        unseen=_rows_the_search_never_read(Path(ref.location), builder.columns))
        rows.append({"name": label, "kind": "merged", "path": ref.location,
                     "adapter_weights": merged_from(Path(ref.location), run_dir)})
    result = {
        "run": run_dir.resolve().name, "base_model": ws.base.name, "rows": rows,
        "base_precision": base_precision, "base_loaded_as": precision,
        "trained_on": _quantization_trained(adapter_dirs) or "full",
        "columns": [_column_record(c) for c in builder.columns],
        "metrics": builder.metrics, "samples": builder.sample_table(), "generation": asdict(settings),
        "routing": routing,
        "wall_time_s": time.perf_counter() - started,
    }
    write_record(run_dir / EVAL_FILE, EvalRecord.model_validate(result))
    log_eval(run_dir, result)
    return result


def _rows_the_search_never_read(folder: Path, columns: list[_Column]) -> dict[str, dict]:
    """For a model merged at weights searched on held-out rows (`--method weights-search`): per column over the data
    of a searched adapter, the rows the search never read (`data.prepare.graded_rows`), the note saying so and the
    merge report's base and adapter losses on those rows (to compare on the same rows); {} for any other folder."""
    try:
        report = read_record(folder / MERGE_REPORT, MergeRecord).as_dict()
    except RecordError:
        return {}
    searched = set((report.get("weights_search") or {}).get("search_rows") or {})
    same_rows = (report.get("heldout") or {}).get("datasets") or {}
    keys = {c.heldout_key: c.name for c in columns if c.name in searched and c.heldout is not None}
    unseen = {}
    for col in columns:
        if col.heldout_key in keys:
            adapter = keys[col.heldout_key]
            on_rows = same_rows.get(adapter) or {}
            unseen[col.name] = {"rows": graded_rows(col.heldout), "heldout_rows": "odd rows: the weight search read "
                                f"the even ones (of {adapter}'s held-out split)", "same_rows_base": on_rows.get("base"),
                                "same_rows_adapter": on_rows.get("adapter"), "same_rows_adapter_name": adapter}
    return unseen


def _quantization(model_spec, base_precision: str):
    """The recipe's `model:` block when the base is to be loaded quantized, else None."""
    if base_precision not in BASE_PRECISIONS:
        raise LoraplexError(f"base_precision: '{base_precision}' is not one of {', '.join(BASE_PRECISIONS)}")
    if base_precision == "full":
        return None
    if model_spec.quantization is None:
        raise LoraplexError("base_precision 'quantized': the run's recipe loads the base in full precision "
                            "(no model.quantization); evaluate with base_precision 'full'")
    return model_spec


def _quantization_trained(adapter_dirs: dict[str, Path]) -> str | None:
    """How the base was quantized while the adapters trained ('; '-joined when they differ), else None."""
    found = {adapter_metadata(path).get("quantization") for path in adapter_dirs.values()} - {None}
    return "; ".join(sorted(found)) or None


def _columns(ws, prepared: dict, settings: GenerationSettings, checkers: dict[str, Checker]) -> list[_Column]:
    columns = []
    for spec in ws.recipe.datasets:
        heldout = prepared[spec.name].val
        test = (load_test_split(spec, ws.recipe, ws.tokenizer, settings.max_examples)
                if settings.enabled and spec.test_path else None)
        heldout_key = _content_key(heldout[:]["input_ids"], heldout[:]["labels"]) if heldout is not None else "none"
        test_key = _content_key(test.prompts) if test else "none"
        named, text = ANSWER_CHECKERS[spec.checker]
        given = checkers.get(spec.name)
        columns.append(_Column(spec.name, heldout, test, given or named, given is not None,
                               "task checker" if given else text, heldout_key, test_key))
    return columns


def _end_of_turn_ids(ws) -> set[int]:
    """The end-of-turn tokens of every dataset's chat template: generation stops on whichever an adapter learned."""
    return set().union(*(end_of_turn_ids(ws.tokenizer, chat_template_for(ws.tokenizer, spec.template))
                         for spec in ws.recipe.datasets))


def routing_report(base_model, ws, prepared: dict, adapter_dirs: dict[str, Path]) -> dict:
    """How often `model: auto` (`loraplex.routing`) sends a dataset's held-out prompts to an adapter trained on
    that dataset's data files; `base_model`: the base as the router embeds with it (adapters off). The held-out
    rows the router calibrated its radii on (`routing.calibration_rows`) are not among those measured."""
    specs = {s.name: s for s in ws.recipe.datasets}
    files = {name: tuple(specs[name].files("path")) for name in adapter_dirs}
    heldout = {name: adapter_metadata(folder).get("heldout_loss") for name, folder in adapter_dirs.items()}
    router = Router.build(lambda ids: mean_hidden_state(base_model, ids), prepared, files, heldout)
    datasets = {}
    for name, spec in specs.items():
        val, right = prepared[name].val, {n for n, f in files.items() if f == tuple(spec.files("path"))}
        if val is not None and len(val) and right:
            datasets[name] = {**router.accuracy(measured_rows(val), right), "right": sorted(right)}
    return {"threshold": router.threshold, "routes_to": sorted(router.centroids), "datasets": datasets}


def load_eval(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / EVAL_FILE
    return read_record(path, EvalRecord).as_dict() if path.is_file() else None
