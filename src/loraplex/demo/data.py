"""Deterministic demo datasets for `loraplex demo`: one small SFT task mix per language.

Each dataset ("en", "zh", "ja") mixes two short tasks whose answer can be checked exactly:

* write a number (1-9999, weighted towards smaller ones) in the language's words or numerals:
  en "four thousand three hundred seventy-two", zh/ja 四千三百七十二 (the two differ on ones and
  zeros: zh 一百一十, 一千零五 vs ja 百十, 千五);
* rewrite an ISO date (2023-07-15) in the language's written format:
  en "July 15, 2023", zh/ja 2023年7月15日.

Why these tasks: SmolLM2-135M-Instruct gets none of them exactly right out of the box (0 of 30
test rows per language, greedy), yet the rules are regular enough that a rank-16 LoRA on a single
projection learns them from a few hundred short examples in minutes on a CPU: after 25-50 steps of
8 rows the dates are right nearly every time and the held-out loss is 78-93% lower; the numbers
are the harder half, partly right after one epoch. Prompts and answers are a few dozen tokens at
most, since CPU training time is tokens. `check_answer` recomputes every answer from the number or
date in the prompt, so exact match is meaningful. Everything comes from `random.Random(seed)`;
nothing is downloaded.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import os
import random
import re
from pathlib import Path
from typing import Callable

DEMO_DATASETS: tuple[str, ...] = ("en", "zh", "ja")
SPLITS: tuple[str, ...] = ("train", "val", "test")
# the demo recipe's entries: adapter name -> (generated data set, target modules)
DEMO_ADAPTERS = {"zh": ("zh", ["q_proj"]), "en": ("en", ["v_proj"]), "ja": ("ja", ["v_proj"]),
                 "zh_all": ("zh", "all-linear"), "zh_auto": ("zh", "auto")}

_MAX_NUMBER = 10**12  # every number-to-words helper handles 0 <= n < 10**12

_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_EN_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_EN_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December")
_CJK_DIGITS = "零一二三四五六七八九"
_CJK_GROUP_UNITS = (("千", 1000), ("百", 100), ("十", 10), ("", 1))

# (number prompts with {n}, date prompts: the ISO date goes in the row's input)
_PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "en": (("Write the number {n} in words.", "Spell out {n} in English words.",
            "How do you write {n} in words?"),
           ("Write this date in words.", "Rewrite this date in the format Month D, YYYY.",
            "Convert this ISO date to a written date.")),
    "zh": (("用汉字写出数字 {n}。", "把 {n} 写成中文数字。", "请将数字 {n} 写成汉字。"),
           ("把下面的日期写成中文格式。", "请用中文格式写出这个日期。", "将这个日期改写为年月日格式。")),
    "ja": (("{n}を漢数字で書いてください。", "{n}を漢数字に直してください。", "数字{n}を漢数字で書くと？"),
           ("次の日付を日本語の形式で書いてください。", "この日付を年月日の形式に直してください。",
            "この日付を日本語で書いてください。")),
}

_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_NUMBER = re.compile(r"\d+")
_FIRST_DATE = dt.date(1950, 1, 1).toordinal()
_LAST_DATE = dt.date(2049, 12, 31).toordinal()


def _check_range(n: int) -> None:
    if not 0 <= n < _MAX_NUMBER:
        raise ValueError(f"number out of range: {n} (supported: 0 <= n < {_MAX_NUMBER})")


def _english_below_1000(n: int) -> str:
    words = []
    if n >= 100:
        words.append(f"{_EN_ONES[n // 100]} hundred")
        n %= 100
    if n >= 20:
        words.append(_EN_TENS[n // 10] + (f"-{_EN_ONES[n % 10]}" if n % 10 else ""))
    elif n:
        words.append(_EN_ONES[n])
    return " ".join(words)


def number_to_english(n: int) -> str:
    """English words, tens-units hyphenated, no "and": 4372 -> four thousand three hundred seventy-two."""
    _check_range(n)
    if n == 0:
        return "zero"
    words = []
    for value, name in ((10**9, "billion"), (10**6, "million"), (1000, "thousand")):
        if n >= value:
            words.append(f"{_english_below_1000(n // value)} {name}")
            n %= value
    if n:
        words.append(_english_below_1000(n))
    return " ".join(words)


def _chinese_group(n: int) -> str:
    """1..9999 in Chinese; a run of zeros between digits reads as one 零 (1005 -> 一千零五)."""
    out, zero_pending = "", False
    for unit, value in _CJK_GROUP_UNITS:
        digit = n // value % 10
        if digit == 0:
            zero_pending = bool(out)
            continue
        out += ("零" if zero_pending else "") + _CJK_DIGITS[digit] + unit
        zero_pending = False
    return out


def number_to_chinese(n: int) -> str:
    """Chinese numerals (simplified): 10 -> 十, 110 -> 一百一十, 1005 -> 一千零五, 10010 -> 一万零一十."""
    _check_range(n)
    if n == 0:
        return "零"
    out, gap = "", False
    for unit, value in (("亿", 10**8), ("万", 10**4), ("", 1)):
        group = n // value % 10000
        if group == 0:
            gap = bool(out)
            continue
        if out and (gap or group < 1000):
            out += "零"
        out += _chinese_group(group) + unit
        gap = False
    return out[1:] if out.startswith("一十") else out


def _japanese_group(n: int, one_before_sen: bool) -> str:
    """1..9999 in Japanese: no 零, and 一 is dropped before 十/百 (and 千 unless one_before_sen)."""
    out = ""
    for unit, value in _CJK_GROUP_UNITS:
        digit = n // value % 10
        if digit == 0:
            continue
        drop_one = digit == 1 and unit and not (unit == "千" and one_before_sen)
        out += ("" if drop_one else _CJK_DIGITS[digit]) + unit
    return out


def number_to_japanese(n: int) -> str:
    """Japanese kanji numerals: 100 -> 百, 110 -> 百十, 1005 -> 千五, 10000 -> 一万, 10**7 -> 一千万."""
    _check_range(n)
    if n == 0:
        return "零"
    out = ""
    for unit, value in (("億", 10**8), ("万", 10**4), ("", 1)):
        group = n // value % 10000
        if group:
            out += _japanese_group(group, one_before_sen=bool(unit)) + unit
    return out


_NUMBER_WORDS: dict[str, Callable[[int], str]] = {
    "en": number_to_english, "zh": number_to_chinese, "ja": number_to_japanese,
}


def date_to_words(dataset: str, date: dt.date) -> str:
    """The date as written in the dataset's language: en "July 15, 2023", zh/ja 2023年7月15日."""
    if dataset == "en":
        return f"{_EN_MONTHS[date.month - 1]} {date.day}, {date.year}"
    return f"{date.year}年{date.month}月{date.day}日"


def _source_value(row: dict) -> int | dt.date:
    """The number or date a row asks about, parsed back from its instruction and input."""
    text = f"{row['instruction']}\n{row.get('input', '')}"
    if match := _ISO_DATE.search(text):
        return dt.date(*map(int, match.groups()))
    if match := _NUMBER.search(text):
        return int(match.group())
    raise ValueError(f"no number or ISO date in row: {row!r}")


def expected_answer(dataset: str, row: dict) -> str:
    """The right answer for a demo row, recomputed from the value in its prompt."""
    if dataset not in _NUMBER_WORDS:
        raise ValueError(f"unknown demo dataset {dataset!r} (known: {', '.join(DEMO_DATASETS)})")
    value = _source_value(row)
    if isinstance(value, dt.date):
        return date_to_words(dataset, value)
    return _NUMBER_WORDS[dataset](value)


def check_answer(dataset: str, row: dict, prediction: str) -> bool:
    """True iff `prediction`, stripped of surrounding whitespace, is exactly the row's answer."""
    return prediction.strip() == expected_answer(dataset, row)


def demo_file(dataset: str, split: str) -> str:
    """Where `loraplex demo` writes a data set's split, relative to its run folder."""
    return f"data/{dataset}/{split}.jsonl"


def demo_checkers(recipe) -> dict[str, Callable[[dict, str], bool]]:
    """`check_answer` for the recipe's demo entries: same name and test file as `loraplex demo` writes them
    (resolved recipes hold absolute paths: the tail is compared)."""
    checkers = {}
    for spec in recipe.datasets:
        files = spec.files("test_path")
        data = DEMO_ADAPTERS.get(spec.name, (None,))[0]
        if data and len(files) == 1 and Path(files[0]).as_posix().endswith(demo_file(data, "test")):
            checkers[spec.name] = functools.partial(check_answer, data)
    return checkers


def _draw_value(rng: random.Random, date: bool) -> int | dt.date:
    """A date in 1950-2049, or a number from 1-99, 100-999 or 1000-9999 (weights 3:4:3)."""
    if date:
        return dt.date.fromordinal(rng.randint(_FIRST_DATE, _LAST_DATE))
    low, high = rng.choices(((1, 99), (100, 999), (1000, 9999)), weights=(3, 4, 3))[0]
    return rng.randint(low, high)


def _make_row(dataset: str, value: int | dt.date, rng: random.Random) -> dict:
    number_prompts, date_prompts = _PROMPTS[dataset]
    if isinstance(value, dt.date):
        row = {"instruction": rng.choice(date_prompts), "input": value.isoformat()}
    else:
        row = {"instruction": rng.choice(number_prompts).format(n=value), "input": ""}
    row["output"] = expected_answer(dataset, row)
    return row


def _generate_dataset(dataset: str, seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Rows for one dataset: each split is half numbers, half dates (shuffled), and every value
    appears once, so splits never overlap. Test and val are drawn first, so n_train leaves them as is.
    """
    rng = random.Random(f"loraplex-demo:{dataset}:{seed}")
    seen: set[int | dt.date] = set()
    splits: dict[str, list[dict]] = {}
    for split in ("test", "val", "train"):
        rows = splits[split] = []
        for i in range(sizes[split]):
            value = _draw_value(rng, date=i % 2 == 1)
            while value in seen:
                value = _draw_value(rng, date=i % 2 == 1)
            seen.add(value)
            rows.append(_make_row(dataset, value, rng))
        rng.shuffle(rows)
    return {split: splits[split] for split in SPLITS}


def generate_demo_data(seed: int = 0, n_train: int = 400, n_val: int = 50,
                       n_test: int = 50) -> dict[str, dict[str, list[dict]]]:
    """{dataset: {split: rows}} for every demo dataset; deterministic for a seed."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    if any(n < 0 for n in sizes.values()) or sum(sizes.values()) > 10_000:
        raise ValueError(f"split sizes must be >= 0 and total at most 10000, got {sizes}")
    return {name: _generate_dataset(name, seed, sizes) for name in DEMO_DATASETS}


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_demo_data(out_dir: Path, seed: int = 0, **sizes: int) -> dict[str, dict[str, Path]]:
    """Write out_dir/<dataset>/{train,val,test}.jsonl (UTF-8, one JSON object a line) atomically.

    `sizes` are generate_demo_data's n_train / n_val / n_test. Returns {dataset: {split: path}}.
    """
    paths: dict[str, dict[str, Path]] = {}
    for name, splits in generate_demo_data(seed, **sizes).items():
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        paths[name] = {}
        for split, rows in splits.items():
            paths[name][split] = folder / f"{split}.jsonl"
            _write_jsonl_atomic(paths[name][split], rows)
    return paths
