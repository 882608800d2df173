"""Reading dataset files and turning each row into chat messages.

Two formats, as real files use them:
- alpaca: `instruction`, `input`, `output`, optional `system` and `history` ([[user, assistant], ...]);
  a non-empty `input` is appended to the instruction after a newline.
- messages: OpenAI-style `messages: [{role, content}, ...]`, multi-turn, roles system/user/assistant.

Every row is either converted or reported as a BadRow with its file and line/row number; no row is
dropped without being counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class BadRow:
    file: str
    where: str  # "line 12" (jsonl) or "row 12" (json list, parquet, csv); 1-based
    problem: str

    def __str__(self) -> str:
        return f"{self.file} {self.where}: {self.problem}"


@dataclass
class RawRow:
    file: str
    where: str
    value: Any


@dataclass
class Conversation:
    """One example: messages plus where it came from (for error messages and row ids)."""

    messages: list[dict[str, str]]
    source: str


@dataclass
class ReadResult:
    conversations: list[Conversation] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    rows: int = 0
    format: str = ""


# --------------------------------------------------------------------------- files


def iter_raw_rows(path: Path) -> Iterator[RawRow | BadRow]:
    """Yield each row of a json / jsonl / parquet / csv file, or a BadRow for an unreadable line."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix in (".parquet", ".csv"):
        yield from _iter_table(path, suffix)
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use .json, .jsonl, .parquet or .csv")


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


def _iter_table(path: Path, suffix: str) -> Iterator[RawRow | BadRow]:
    import datasets

    try:
        table = datasets.Dataset.from_parquet(str(path)) if suffix == ".parquet" else \
            datasets.Dataset.from_csv(str(path), keep_default_na=False, features=_all_string_columns(path))
    except Exception as exc:  # the readers raise many types; any of them means an unreadable file
        raise DataError(f"{path}: cannot read as {suffix[1:]} ({exc})") from None
    for number, value in enumerate(table, start=1):
        yield RawRow(str(path), f"row {number}", value)


def _all_string_columns(path: Path) -> "datasets.Features":  # noqa: F821
    """Every CSV column as text: a column of numeric answers ("42") must not become int."""
    import csv

    import datasets

    with path.open(encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


# --------------------------------------------------------------------------- formats


def detect_format(row: Any, columns: dict[str, str]) -> str | None:
    if not isinstance(row, dict):
        return None
    if columns.get("messages", "messages") in row:
        return "messages"
    if columns.get("instruction", "instruction") in row and columns.get("output", "output") in row:
        return "alpaca"
    return None


def read_conversations(paths: list[Path], fmt: str = "auto", columns: dict[str, str] | None = None,
                       system: str | None = None, max_rows: int | None = None) -> ReadResult:
    """Read every file (the first `max_rows` rows at most); convert rows to conversations; collect bad rows."""
    columns = columns or {}
    result = ReadResult(format=fmt)
    for path in paths:
        for raw in iter_raw_rows(path):
            if max_rows is not None and result.rows >= max_rows:
                return result
            result.rows += 1
            if isinstance(raw, BadRow):
                result.bad_rows.append(raw)
                continue
            detected = detect_format(raw.value, columns)
            if result.format == "auto":
                if detected is None:
                    keys = sorted(raw.value)[:8] if isinstance(raw.value, dict) else type(raw.value).__name__
                    raise DataError(f"{raw.file} {raw.where}: cannot detect the format from the fields {keys}; "
                                    "set format: alpaca (instruction/input/output) or messages, and map "
                                    "other column names with columns:")
                result.format = detected
            try:
                messages = to_messages(raw.value, result.format, columns, system)
            except ValueError as exc:
                mixed = detected and detected != result.format
                hint = (f" (this row is {detected} format but the dataset is {result.format}; a dataset holds one "
                        "format: move such rows to a dataset entry of their own)") if mixed else ""
                result.bad_rows.append(BadRow(raw.file, raw.where, f"{exc}{hint}"))
                continue
            result.conversations.append(Conversation(messages, f"{raw.file} {raw.where}"))
    return result


def to_messages(row: Any, fmt: str, columns: dict[str, str], system: str | None) -> list[dict[str, str]]:
    """Convert one row; raise ValueError naming the field and the bad value."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__} {_short(row)}")
    messages = _alpaca_messages(row, columns) if fmt == "alpaca" else _chat_messages(row, columns)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("no assistant answer to train on")
    return messages


def _text_field(row: dict, key: str, required: bool) -> str:
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__} {_short(value)}")
    _check_text(value, f"field '{key}'")
    return value


def _check_text(value: str, where: str) -> None:
    """Refuse what no tokenizer should see: NUL characters and lone surrogates (not encodable as UTF-8)."""
    if "\x00" in value:
        raise ValueError(f"{where} contains a NUL character at position {value.index(chr(0))}; remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} holds an invalid character at position {exc.start} "
                         f"(a lone surrogate {value[exc.start]!r}); fix the text's encoding") from None


def _alpaca_messages(row: dict, columns: dict[str, str]) -> list[dict[str, str]]:
    col = lambda role: columns.get(role, role)  # noqa: E731
    instruction = _text_field(row, col("instruction"), required=True)
    extra = _text_field(row, col("input"), required=False)
    output = _text_field(row, col("output"), required=True)
    if not output.strip():
        raise ValueError(f"field '{col('output')}' is empty: no answer to train on")
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    if not user.strip():
        raise ValueError(f"field '{col('instruction')}' is empty")
    messages: list[dict[str, str]] = []
    row_system = _text_field(row, col("system"), required=False)
    if row_system.strip():
        messages.append({"role": "system", "content": row_system})
    history = row.get(col("history")) or []
    if not isinstance(history, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in history):
        raise ValueError(f"field '{col('history')}' must be a list of [user, assistant] string pairs, "
                         f"got {_short(history)}")
    for n, (question, answer) in enumerate(history):
        _check_text(question, f"{col('history')}[{n}][0]")
        _check_text(answer, f"{col('history')}[{n}][1]")
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _chat_messages(row: dict, columns: dict[str, str]) -> list[dict[str, str]]:
    key = columns.get("messages", "messages")
    if key not in row:
        raise ValueError(f"missing field '{key}'")
    raw = row[key]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"field '{key}' must be a non-empty list of {{role, content}} objects, got {_short(raw)}")
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"{key}[{i}] must be an object with 'role' and 'content', got {_short(msg)}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise ValueError(f"{key}[{i}].role is {_short(role)}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{key}[{i}].content must be a string, got {type(content).__name__} {_short(content)}")
        _check_text(content, f"{key}[{i}].content")
        if role == "system" and i != 0:
            raise ValueError(f"{key}[{i}] is a system message; only the first message may be one")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message of '{key}' must be the assistant's answer")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{key}[0] is the assistant's; put the user's message (or a system message) before it")
    return messages


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
