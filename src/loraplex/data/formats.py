"""Turning each row of a dataset (read by `sources`) into chat messages.

Three formats, as real files use them:
- alpaca: `instruction`, `input`, `output`, optional `system` and `history` ([[user, assistant], ...]);
  a non-empty `input` is appended to the instruction after a newline.
- messages: OpenAI-style `messages: [{role, content}, ...]`, multi-turn, roles system/user/assistant.
- sharegpt: `conversations: [{from, value}, ...]`, from human/gpt/system (user/assistant too), and an optional
  `system` column.
`columns:` maps each role to the dataset's own column name (`messages` names the list of turns of either chat
format).

Every row is either converted or reported as a BadRow with its file and line/row number; no row is
dropped without being counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .sources import BadRow, iter_raw_rows

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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


# --------------------------------------------------------------------------- formats


def detect_format(row: Any, columns: dict[str, str]) -> str | None:
    if not isinstance(row, dict):
        return None
    turns_key = columns.get("messages") or ("messages" if "messages" in row else "conversations")
    if turns_key in row:
        turns = row[turns_key]
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        if "from" in first or "role" in first:
            return "sharegpt" if "from" in first else "messages"
        return "sharegpt" if turns_key == "conversations" else "messages"
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
                                    "set format: alpaca (instruction/input/output), messages or sharegpt "
                                    "(conversations), and map other column names with columns:")
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
    if fmt == "alpaca":
        messages = _alpaca_messages(row, columns)
    elif fmt == "sharegpt":
        messages = _sharegpt_messages(row, columns)
    else:
        messages = _chat_messages(row, columns.get("messages", "messages"), "role", "content", {r: r for r in ROLES})
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


def _sharegpt_messages(row: dict, columns: dict[str, str]) -> list[dict[str, str]]:
    messages = _chat_messages(row, columns.get("messages", "conversations"), "from", "value", SHAREGPT_ROLES)
    row_system = _text_field(row, columns.get("system", "system"), required=False)
    if row_system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": row_system})
    return messages


def _chat_messages(row: dict, key: str, role_key: str, content_key: str,
                   roles: dict[str, str]) -> list[dict[str, str]]:
    """The turns under `key`, each {role_key: one of `roles` (-> its chat role), content_key: text}."""
    if key not in row:
        raise ValueError(f"missing field '{key}'")
    raw = row[key]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"field '{key}' must be a non-empty list of {{{role_key}, {content_key}}} objects, "
                         f"got {_short(raw)}")
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or role_key not in msg or content_key not in msg:
            raise ValueError(f"{key}[{i}] must be an object with '{role_key}' and '{content_key}', got {_short(msg)}")
        role, content = msg[role_key], msg[content_key]
        if role not in roles:
            raise ValueError(f"{key}[{i}].{role_key} is {_short(role)}; use one of {', '.join(roles)}")
        if not isinstance(content, str):
            raise ValueError(f"{key}[{i}].{content_key} must be a string, got {type(content).__name__} "
                             f"{_short(content)}")
        _check_text(content, f"{key}[{i}].{content_key}")
        if roles[role] == "system" and i != 0:
            raise ValueError(f"{key}[{i}] is a system message; only the first message may be one")
        messages.append({"role": roles[role], "content": content})
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message of '{key}' must be the assistant's answer")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{key}[0] is the assistant's; put the user's message (or a system message) before it")
    return messages


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
