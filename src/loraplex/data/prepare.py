"""Dataset preparation: read, render, tokenize with answer-only labels, split, cache, and measure.

The tokenized cache (datasets Arrow folders under `$LORAPLEX_HOME/data/`) is keyed by a hash of the sources' bytes
(files, save_to_disk folders, a hub dataset's cached files), the tokenizer, the chat template, max_seq_length and
every format option, so an edited file or another tokenizer never reuses a stale cache.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir, file_lock
from ..errors import DataError
from ..device import loraplex_home
from ..recipe import DatasetSpec, Recipe
from .formats import ReadResult, read_conversations
from .sources import source_digest
from .render import chat_template_for, encode

CACHE_VERSION = 2  # 2: rows held out by a hash of their content
COMPLETE_MARKER = "complete.json"
MAX_LISTED_BAD_ROWS = 20


@dataclass
class PreparedDataset:
    name: str
    train: "datasets.Dataset"  # noqa: F821 - columns: input_ids, labels, length, answer_tokens, source
    val: "datasets.Dataset | None"  # noqa: F821
    stats: dict
    cache_dir: Path
    fingerprint: str  # the data files' bytes
    rows_key: str  # everything that makes the tokenized rows (files, tokenizer, template, lengths, split): cache_key


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def data_fingerprint(spec: DatasetSpec, recipe: Recipe) -> str:
    """Hash of the dataset's bytes (train and val sources, in order: `sources.source_digest`)."""
    digest = hashlib.sha256()
    for which in ("path", "val_path"):
        for file in spec.files(which):
            digest.update(which.encode())
            digest.update(source_digest(recipe.resolve(file)))
    return digest.hexdigest()[:16]


def cache_key(spec: DatasetSpec, recipe: Recipe, tokenizer, template: str, held_out_elsewhere: float = 0.0) -> str:
    options = {
        "version": CACHE_VERSION, "data": data_fingerprint(spec, recipe), "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template, "max_seq_length": spec.max_seq_length, "format": spec.format,
        "columns": spec.columns, "system": spec.system, "on_bad_rows": spec.on_bad_rows,
        "max_samples": spec.max_samples, "val_size": spec.val_size, "held_out_elsewhere": held_out_elsewhere,
    }
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def prepare_all(recipe: Recipe, tokenizer, only: list[str] | None = None) -> dict[str, PreparedDataset]:
    """Prepare every dataset of the recipe (or the named ones); errors of all datasets at once."""
    prepared: dict[str, PreparedDataset] = {}
    problems: list[str] = []
    for spec in recipe.datasets:
        if only and spec.name not in only:
            continue
        try:
            prepared[spec.name] = prepare_dataset(spec, recipe, tokenizer, held_out_elsewhere(spec, recipe))
        except DataError as exc:
            problems.extend(([exc.title] if exc.title else []) + exc.problems)
    if problems:
        raise DataError(problems, title="the data cannot be prepared")
    return prepared


def held_out_elsewhere(spec: DatasetSpec, recipe: Recipe) -> float:
    """The largest val_size of the recipe's other datasets that hold out rows of a file this one trains on: rows
    held out there are not trained on here, so no adapter's held-out rows are another's training rows."""
    files = {recipe.resolve(f).resolve() for f in spec.files("path")}
    largest = max((other.val_size for other in recipe.datasets if other.name != spec.name and not other.val_path
                   and files & {recipe.resolve(f).resolve() for f in other.files("path")}), default=0.0)
    own = 0.0 if spec.val_path else spec.val_size
    return largest if largest > own else 0.0  # 0 when it changes nothing, so the cache and fingerprints stay


def prepare_dataset(spec: DatasetSpec, recipe: Recipe, tokenizer, held_out_elsewhere: float = 0.0) -> PreparedDataset:
    """Tokenized train/val splits and statistics for one dataset entry, from cache when valid."""
    import datasets

    template = chat_template_for(tokenizer, spec.template)
    key = cache_key(spec, recipe, tokenizer, template, held_out_elsewhere)
    cache_dir = loraplex_home() / "data" / f"{spec.name}-{key}"
    with file_lock(loraplex_home() / "locks" / f"data-{spec.name}-{key}.lock"):
        if not (cache_dir / COMPLETE_MARKER).is_file():
            _build_cache(spec, recipe, tokenizer, template, cache_dir, held_out_elsewhere)
    stats = json.loads((cache_dir / COMPLETE_MARKER).read_text(encoding="utf-8"))
    train = datasets.load_from_disk(str(cache_dir / "train"))
    val = datasets.load_from_disk(str(cache_dir / "val")) if (cache_dir / "val").is_dir() else None
    return PreparedDataset(spec.name, train, val, stats, cache_dir, data_fingerprint(spec, recipe), key)


def _build_cache(spec: DatasetSpec, recipe: Recipe, tokenizer, template: str, cache_dir: Path,
                 held_out_elsewhere: float) -> None:
    import datasets

    train_read = _read(spec, recipe, "path")
    val_read = _read(spec, recipe, "val_path") if spec.val_path else None
    train_rows, train_stats = _encode_all(train_read, tokenizer, template, spec)
    places = train_stats.pop("places")
    if val_read is not None:
        val_rows, val_stats = _encode_all(val_read, tokenizer, template, spec)
        val_stats.pop("places")
        train_rows = [row for row, place in zip(train_rows, places) if place >= held_out_elsewhere]
    else:
        train_rows, val_rows = split_rows(train_rows, places, spec.val_size, held_out_elsewhere)
        val_stats = None
    train_stats["held_out_elsewhere"] = len(places) - len(train_rows) - (0 if val_read else len(val_rows))
    if not train_rows and not train_stats["dropped"]:
        skipped = len(train_read.bad_rows) + train_stats["template_errors"]
        raise DataError(f"dataset '{spec.name}': no usable training example left ({skipped} bad row(s) of "
                        f"{train_read.rows} skipped); set on_bad_rows: error to list them, then fix them")
    if not train_rows:
        raise DataError(f"dataset '{spec.name}': no usable training example left "
                        f"({train_stats['dropped']} dropped because max_seq_length={spec.max_seq_length} "
                        "cuts off every answer); raise max_seq_length")
    stats = _summarize(spec, train_read, train_stats, val_read, val_stats, len(train_rows), len(val_rows))
    stats["answer_tokens"] = sum(r["answer_tokens"] for r in train_rows + val_rows)
    stats["total_tokens"] = sum(r["length"] for r in train_rows + val_rows)  # kept examples, after truncation
    with atomic_dir(cache_dir) as tmp:
        datasets.Dataset.from_list(train_rows).save_to_disk(str(tmp / "train"))
        if val_rows:
            datasets.Dataset.from_list(val_rows).save_to_disk(str(tmp / "val"))
        (tmp / COMPLETE_MARKER).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read(spec: DatasetSpec, recipe: Recipe, which: str) -> ReadResult:
    files = [recipe.resolve(f) for f in spec.files(which)]
    try:
        result = read_conversations(files, spec.format, spec.columns, spec.system,
                                    spec.max_samples if which == "path" else None)
    except DataError as exc:
        raise DataError([f"dataset '{spec.name}': {p}" for p in exc.problems]) from None
    if result.bad_rows and spec.on_bad_rows == "error":
        listed = [str(b) for b in result.bad_rows[:MAX_LISTED_BAD_ROWS]]
        more = len(result.bad_rows) - len(listed)
        tail = [f"... and {more} more"] if more else []
        raise DataError(listed + tail + [f"fix these rows, or set on_bad_rows: skip for dataset '{spec.name}' "
                                         "to skip them (they are counted)"],
                        title=f"dataset '{spec.name}': {len(result.bad_rows)} bad row(s) of {result.rows}")
    return result


def _encode_all(read: ReadResult, tokenizer, template: str, spec: DatasetSpec) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    places: list[float] = []  # each kept row's place in [0, 1), from its content: what decides its split
    lengths: list[int] = []
    truncated = dropped = template_errors = 0
    for conv in read.conversations:
        try:
            enc = encode(tokenizer, conv.messages, template, spec.max_seq_length)
        except ValueError as exc:  # template cannot be segmented: report, do not train on it
            if spec.on_bad_rows == "error":
                raise DataError(f"{conv.source}: {exc}") from None
            template_errors += 1
            continue
        lengths.append(enc.full_length)
        if enc.answer_tokens == 0:
            dropped += 1
            continue
        if enc.full_length > spec.max_seq_length:  # kept but cut (dropped ones count only as dropped)
            truncated += 1
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels, "length": len(enc.input_ids),
                     "answer_tokens": enc.answer_tokens, "source": conv.source})
        places.append(content_place(conv.messages))
    return rows, {"lengths": lengths, "truncated": truncated, "dropped": dropped, "template_errors": template_errors,
                  "places": places}


def content_place(messages: list[dict]) -> float:
    """A conversation's place in [0, 1): a hash of its turns (the system prompt left out), so the same row gets
    the same place in every dataset that reads it, whatever its template, system prompt or position."""
    turns = [[m["role"], m["content"]] for m in messages if m["role"] != "system"]
    digest = hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()
    return int(digest[:16], 16) / 2**64


def split_rows(rows: list, places: list[float], val_size: float,
               held_out_elsewhere: float = 0.0) -> tuple[list, list]:
    """Held out: the rows placed below `val_size`, or else those at the lowest place (copies of one content share a
    place, so they always share a side); trained on: the rest, less the rows placed below `held_out_elsewhere`
    (another dataset's val_size). When every row would be held out, the rows at the highest place are trained on."""
    if val_size <= 0 or len(set(places)) < 2:
        return [r for r, p in zip(rows, places) if p >= held_out_elsewhere] or rows, []
    cut = val_size if min(places) < val_size else math.nextafter(min(places), 1.0)
    cut = min(cut, max(places))  # the highest place always trains
    floor = max(cut, held_out_elsewhere)
    train = [r for r, p in zip(rows, places) if p >= floor] or [r for r, p in zip(rows, places) if p >= cut]
    return train, [r for r, p in zip(rows, places) if p < cut]


def decision_rows(split):
    """The held-out rows a decision may read (the weight search, the router's calibration): the even ones."""
    return split.select(range(0, len(split), 2))


def graded_rows(split):
    """The held-out rows the figures grading such a decision come from: the odd ones, which it never read."""
    return split.select(range(1, len(split), 2))


def percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def recommended_max_seq_length(lengths: list[int]) -> int:
    """Covers 99% of the examples, rounded up to a multiple of 64."""
    p99 = percentile(sorted(lengths), 99)
    return max(64, math.ceil(p99 / 64) * 64)


def _summarize(spec: DatasetSpec, train_read: ReadResult, train_stats: dict, val_read: ReadResult | None,
               val_stats: dict | None, n_train: int, n_val: int) -> dict:
    lengths = sorted(train_stats["lengths"] + (val_stats["lengths"] if val_stats else []))
    reads = [train_read] + ([val_read] if val_read else [])
    parts = [train_stats] + ([val_stats] if val_stats else [])
    return {
        "name": spec.name, "format": train_read.format, "rows": sum(r.rows for r in reads),
        "bad_rows": sum(len(r.bad_rows) for r in reads) + sum(p["template_errors"] for p in parts),
        "train": n_train, "val": n_val, "held_out_elsewhere": train_stats["held_out_elsewhere"],
        "truncated": sum(p["truncated"] for p in parts), "dropped": sum(p["dropped"] for p in parts),
        "length_p50": percentile(lengths, 50), "length_p90": percentile(lengths, 90),
        "length_p99": percentile(lengths, 99), "length_max": lengths[-1] if lengths else 0,
        "max_seq_length": spec.max_seq_length, "recommended_max_seq_length": recommended_max_seq_length(lengths),
    }
