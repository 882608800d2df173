"""Evaluation: held-out metrics on answer tokens, greedy generation metrics, and the run's eval matrix.

Training reports its held-out loss through `lm.packed.heldout_metrics`, so the evaluation matrix's diagonal
equals the numbers recorded at training time.

`evaluate_run` builds the matrix: rows are the base, each trained adapter and any merged model folders;
columns are the recipe's datasets. Each cell holds the held-out loss, perplexity and token accuracy,
and, where the dataset has a test split, exact match and chrF of greedy answers. The base is loaded
once with every adapter on it; two columns over the same data are computed once per row. Greedy answers are
decoded as `loraplex serve` decodes (`lm.decoding`): the test prompts of the base and of every adapter in shared
continuous batches, each batch row with its own adapter (PEFT's `adapter_names`), a row leaving when it ends.
The base is loaded in full precision, QLoRA runs included (their adapters are ordinary LoRA weights);
`base_precision="quantized"` loads it as the recipe's `model.quantization` instead. eval.json says which.
A merge whose weights were searched on the even rows of held-out splits (`method=MergeMethod.WEIGHTS_SEARCH`) is
scored on the odd rows of those splits only, beside the merge report's base and adapter losses on the same rows.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

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
from .routing import Router, mean_hidden_states, measured_rows
from .run import (EVAL_FILE, MERGE_REPORT, adapter_dir, adapter_metadata, is_complete, merged_from, open_run,
                  weights_hash,
                  writer_lock)
from .lm.decoding import GreedyJob, Target, greedy_answers
from .lm.packed import heldout_metrics
from .timing import phase
from .tracking import log_eval


# (reference, prediction) -> correct. The reference is whatever the caller lists as references:
# the expected answer strings by default, the raw test rows for a task checker that reads them.
Checker = Callable[[Any, str], bool]


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


@dataclass
class _Row:
    """One row of the matrix: a model, or an adapter (`adapter`) on the shared base."""

    label: str
    adapter: str | None = None
    own: str | None = None  # the adapter's dataset: without `settings.cross` it generates only on that test split
    # column -> {"rows": held-out rows to score instead of the whole split, "note", ...} (for a model whose weights
    # were chosen on the other rows); the rest of the entry is kept in the cell
    unseen: dict[str, dict] = field(default_factory=dict)


class _MatrixBuilder:
    """Computes the rows of the matrix, several models of one loaded model at a time; columns over identical data
    share their results."""

    def __init__(self, columns: list[_Column], tokenizer, settings: GenerationSettings, stop_ids: set[int]):
        self.columns, self.tokenizer, self.settings, self.stop_ids = columns, tokenizer, settings, stop_ids
        self.metrics: dict[str, dict[str, dict]] = {}
        self.samples: dict[str, dict[str, list[str]]] = {}  # row -> column -> first predictions
        self._prompt_ids: dict[str, list[list[int]]] = {}  # test key -> token ids of its prompts

    def add_rows(self, model, rows: list[_Row], use: Callable[[str | None], Any] | None = None) -> None:
        """`rows` all run on `model`: the base and its adapters (`use(name)` switches to one, None: the base; each
        row's adapter is picked per batch row when PEFT can mix them), or one plain model (`use` None)."""
        with phase("evaluation: held-out losses"):
            heldout = {row.label: self._heldout(model, row, use) for row in rows}
        with phase("evaluation: generation"):
            answers = self._answers(model, rows, use)
        for row in rows:
            cells, kept = {}, {}
            for col in self.columns:
                restricted = row.unseen.get(col.name)
                cell = dict(heldout[row.label][(col.heldout_key, bool(restricted))])
                if restricted:
                    cell.update({k: v for k, v in restricted.items() if k != "rows"},
                                heldout_examples=len(restricted["rows"]))
                predictions = answers.get((row.label, col.test_key)) if self._generates(row, col) else None
                if predictions is not None:
                    references = col.test.rows if col.reads_rows else col.test.references
                    cell.update(exact_match=exact_match(predictions, references, col.checker),
                                chrf=chrf(predictions, col.test.references), test_examples=len(predictions))
                    kept[col.name] = predictions[:self.settings.samples]
                cells[col.name] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in cell.items()}
            self.metrics[row.label], self.samples[row.label] = cells, kept

    def _heldout(self, model, row: _Row, use) -> dict[tuple, dict]:
        if use is not None:
            use(row.adapter)
        out: dict[tuple, dict] = {}
        for col in self.columns:
            restricted = row.unseen.get(col.name)
            key = (col.heldout_key, bool(restricted))
            if key not in out:
                out[key] = heldout_metrics(model, restricted["rows"] if restricted else col.heldout)
        return out

    def _generates(self, row: _Row, col: _Column) -> bool:
        own_keys = {c.test_key for c in self.columns if c.name == row.own}
        wanted = self.settings.cross or row.own is None or col.test_key in own_keys
        return wanted and col.test is not None and bool(col.test.prompts)

    def _answers(self, model, rows: list[_Row], use) -> dict[tuple[str, str], list[str]]:
        """(row label, test key) -> greedy answers to that test split's prompts. Rows on one model decode in
        shared batches, each prompt with its row's adapter; adapters PEFT cannot mix (DoRA) decode one by one."""
        wanted: dict[tuple[str, str], tuple[_Row, _Column]] = {}
        for row in rows:
            for col in self.columns:
                if self._generates(row, col):
                    wanted.setdefault((row.label, col.test_key), (row, col))
        adapters = [row.adapter for row in rows if row.adapter]
        mixed = bool(adapters) and not any(getattr(cfg, "use_dora", False)
                                           for cfg in getattr(model, "peft_config", {}).values())
        groups = [list(wanted.items())] if mixed or use is None else \
            [[(k, v) for k, v in wanted.items() if v[0].label == row.label] for row in rows]
        eos = stop_token_ids(model, self.tokenizer) | set(self.stop_ids)
        answers = {}
        for group in filter(None, groups):
            if use is not None:  # mixed: adapter layers on, each batch row picks its own through adapter_names
                use(adapters[0] if mixed else group[0][1][0].adapter)
            jobs = [GreedyJob(Target(row.label, row.adapter), ids, self.settings.max_new_tokens)
                    for _, (row, col) in group for ids in self._prompts(col)]
            texts = iter(greedy_answers(model, self.tokenizer, jobs, eos, self.settings.batch_size, mixed))
            for key, (_, col) in group:
                answers[key] = [next(texts) for _ in col.test.prompts]
        return answers

    def _prompts(self, col: _Column) -> list[list[int]]:
        if col.test_key not in self._prompt_ids:
            self._prompt_ids[col.test_key] = [self.tokenizer(p, add_special_tokens=False)["input_ids"]
                                              for p in col.test.prompts]
        return self._prompt_ids[col.test_key]

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
    log(f"evaluating {base_row} and the adapters {', '.join(adapter_dirs)}")
    builder.add_rows(adapter_set.model, [_Row(base_row)] + [_Row(name, name, name) for name in adapter_dirs],
                     use=adapter_set.use)
    rows += [{"name": name, "kind": "adapter", "dataset": name, "path": str(adapter_dirs[name]),
              "adapter_weights": {name: weights_hash(adapter_dirs[name])}} for name in adapter_dirs]
    log("routing held-out prompts (model: auto)")
    with phase("evaluation: routing"):
        routing = routing_report(adapter_set.use(None).model, ws, prepared, adapter_dirs)
    del adapter_set
    for i, ref in enumerate(merged_refs):
        label = f"merged:{Path(ref.location).name}"
        label = label if label not in builder.metrics else f"{label}#{i + 1}"  # two folders of one name
        log(f"evaluating {label}")
        builder.add_rows(_to_accelerator(load_model(ref, ws.dtype)),
                         [_Row(label, unseen=_rows_the_search_never_read(Path(ref.location), builder.columns))])
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
    """For a model merged at weights searched on held-out rows (`method=MergeMethod.WEIGHTS_SEARCH`): per column over
    the data of a searched adapter, the rows the search never read (`data.prepare.graded_rows`), the note saying so and
    the merge report's base and adapter losses on those rows (to compare on the same rows); {} for any other folder."""
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
    router = Router.build(lambda prompts: mean_hidden_states(base_model, prompts), prepared, files, heldout)
    datasets = {}
    for name, spec in specs.items():
        val, right = prepared[name].val, {n for n, f in files.items() if f == tuple(spec.files("path"))}
        if val is not None and len(val) and right:
            datasets[name] = {**router.accuracy(measured_rows(val), right), "right": sorted(right)}
    return {"threshold": router.threshold, "routes_to": sorted(router.centroids), "datasets": datasets}


def load_eval(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / EVAL_FILE
    return read_record(path, EvalRecord).as_dict() if path.is_file() else None
