"""Where a dataset's rows come from: files, `datasets` folders and hub ids, each yielding raw rows one by one.

- .json (a list of rows), .jsonl / .ndjson (one row a line)
- .parquet, .csv (every column read as text), .arrow (a `datasets` Arrow file)
- a folder written by `datasets`' `save_to_disk` (one split; a DatasetDict's folder names its splits)
- `hf:owner/name[:split]` (split default: train): `datasets.load_dataset`, which reads its local cache first
  and, with HF_DATASETS_OFFLINE=1, nothing else

Every row is yielded as a RawRow with its place ("line 12" in a JSON Lines file, "row 12" elsewhere; 1-based) or,
when it cannot be read, a BadRow: the formats turn RawRows into conversations or BadRows, nothing is dropped
without being counted. `source_digest` hashes what a source's rows are read from, for the tokenized cache's key.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError
from ..recipe import HUB_PREFIX
TABLE_SUFFIXES = (".parquet", ".csv", ".arrow")
FILE_TYPES = ".json, .jsonl, .parquet, .csv, .arrow, a save_to_disk folder or hf:owner/name[:split]"


@dataclass(frozen=True)
class BadRow:
    file: str
    where: str  # "line 12" (jsonl) or "row 12" (json list, parquet, csv, arrow, datasets); 1-based
    problem: str

    def __str__(self) -> str:
        return f"{self.file} {self.where}: {self.problem}"


@dataclass
class RawRow:
    file: str
    where: str
    value: Any


def is_hub_id(source: str | Path) -> bool:
    return str(source).startswith(HUB_PREFIX)


def hub_name_and_split(source: str) -> tuple[str, str]:
    """"hf:owner/name:test" -> ("owner/name", "test"); the split defaults to train."""
    name, _, split = source[len(HUB_PREFIX):].partition(":")
    return name, split or "train"


def iter_raw_rows(path: Path | str) -> Iterator[RawRow | BadRow]:
    """Yield each row of a file, a save_to_disk folder or a hub dataset, or a BadRow for an unreadable line."""
    if is_hub_id(path):
        yield from _iter_dataset(str(path), _load_hub(str(path)))
        return
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _iter_dataset(str(path), _load_folder(path))
    elif suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix in TABLE_SUFFIXES:
        yield from _iter_dataset(str(path), _load_table(path, suffix))
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use {FILE_TYPES}")


def source_digest(path: Path | str) -> bytes:
    """What the rows are read from: a file's bytes themselves (what fingerprints have always hashed); a digest of
    a folder's files (names and bytes) or of a hub dataset's cached Arrow files (names and bytes) and split."""
    if is_hub_id(path):
        dataset = _load_hub(str(path))
        files = [Path(f["filename"]) for f in dataset.cache_files]
        return _files_digest([(f.name, f) for f in files], str(path))
    path = Path(path)
    if path.is_dir():
        return _files_digest([(str(f.relative_to(path)), f) for f in sorted(path.rglob("*")) if f.is_file()], "")
    return path.read_bytes()


def _files_digest(files: list[tuple[str, Path]], salt: str) -> bytes:
    digest = hashlib.sha256(salt.encode())
    for name, file in files:
        digest.update(name.encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.digest()


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist; check the dataset's path") from None
    if not data.strip():
        raise DataError(f"{path}: file is empty; it needs at least one row")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 (line {line}, byte {exc.start}); re-save the file as UTF-8") from None


def _iter_jsonl(path: Path) -> Iterator[RawRow | BadRow]:
    # split on "\n" only: str.splitlines() also splits at U+2028, U+2029 and U+0085, which JSON strings may hold
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield RawRow(str(path), f"line {number}", json.loads(line))
        except json.JSONDecodeError as exc:
            yield BadRow(str(path), f"line {number}", f"invalid JSON ({exc.msg} at column {exc.colno})")


def _iter_json(path: Path) -> Iterator[RawRow | BadRow]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if _looks_like_jsonl(text):
            raise DataError(f"{path}: this looks like JSON Lines (one object per line); rename it to .jsonl") from None
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); fix the syntax "
                        "there") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        hint = f"; the rows may be under '{lists[0]}': extract that list" if lists else ""
        raise DataError(f"{path}: holds a JSON object, but a dataset is a list of rows{hint}")
    if not isinstance(data, list):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}, but a dataset is a list of rows")
    for number, value in enumerate(data, start=1):
        yield RawRow(str(path), f"row {number}", value)


def _looks_like_jsonl(text: str) -> bool:
    lines = [ln for ln in text.split("\n") if ln.strip()][:3]
    try:
        return len(lines) > 1 and all(isinstance(json.loads(ln), dict) for ln in lines)
    except json.JSONDecodeError:
        return False


def _iter_dataset(name: str, table) -> Iterator[RawRow]:
    for number, value in enumerate(table, start=1):
        yield RawRow(name, f"row {number}", value)


def _load_table(path: Path, suffix: str):
    import datasets

    if not path.is_file():
        raise DataError(f"{path}: file does not exist; check the dataset's path")
    try:
        if suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path))
        if suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        return datasets.Dataset.from_csv(str(path), keep_default_na=False, features=_all_string_columns(path))
    except Exception as exc:  # the readers raise many types; any of them means an unreadable file
        raise DataError(f"{path}: cannot read as {suffix[1:]} ({exc})") from None


def _load_folder(path: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError for a plain folder, arrow errors for damaged files
        raise DataError(f"{path}: a folder must be one written by datasets' save_to_disk, and this one cannot be "
                        f"read as one ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(f"{path / split}" for split in loaded)
        raise DataError(f"{path}: holds the splits {list(loaded)}; name one of their folders ({splits})")
    return loaded


def _load_hub(source: str):
    import datasets

    name, split = hub_name_and_split(source)
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline and not cached, unknown split, no such repository...
        raise DataError(f"{source}: cannot load split '{split}' of the hub dataset '{name}' ({exc}); check the id "
                        "and split, and that it is in the local datasets cache when offline") from None


def _all_string_columns(path: Path) -> "datasets.Features":  # noqa: F821
    """Every CSV column as text: a column of numeric answers ("42") must not become int."""
    import csv

    import datasets

    with path.open(encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh), [])
    return datasets.Features({name: datasets.Value("string") for name in header})
