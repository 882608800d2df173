"""The demo data generator: exact numerals per language, determinism, disjoint splits, JSONL output."""
from __future__ import annotations

import json

import pytest

from loraplex.demo.data import (
    DEMO_DATASETS,
    check_answer,
    generate_demo_data,
    number_to_chinese,
    number_to_english,
    number_to_japanese,
    write_demo_data,
)

SMALL = {"n_train": 60, "n_val": 20, "n_test": 20}

ENGLISH = {
    0: "zero", 7: "seven", 15: "fifteen", 19: "nineteen", 20: "twenty", 40: "forty",
    42: "forty-two", 99: "ninety-nine", 100: "one hundred", 101: "one hundred one",
    110: "one hundred ten", 1000: "one thousand", 1005: "one thousand five",
    2020: "two thousand twenty", 4372: "four thousand three hundred seventy-two",
    10010: "ten thousand ten", 123456: "one hundred twenty-three thousand four hundred fifty-six",
    1_000_000: "one million",
}
CHINESE = {
    0: "零", 1: "一", 10: "十", 15: "十五", 20: "二十", 100: "一百", 101: "一百零一",
    110: "一百一十", 1000: "一千", 1005: "一千零五", 1050: "一千零五十", 2020: "二千零二十",
    4372: "四千三百七十二", 10000: "一万", 10010: "一万零一十", 10100: "一万零一百",
    100000: "十万", 110000: "十一万", 1_000_000: "一百万", 10_000_000: "一千万",
    100_000_001: "一亿零一", 100_001_000: "一亿零一千",
}
JAPANESE = {
    0: "零", 1: "一", 10: "十", 15: "十五", 20: "二十", 100: "百", 101: "百一", 110: "百十",
    1000: "千", 1005: "千五", 1050: "千五十", 2020: "二千二十", 4372: "四千三百七十二",
    10000: "一万", 10010: "一万十", 10100: "一万百", 100000: "十万", 110000: "十一万",
    10_000_000: "一千万", 100_000_001: "一億一",
}


@pytest.mark.parametrize(("n", "words"), ENGLISH.items())
def test_number_to_english(n, words):
    assert number_to_english(n) == words


@pytest.mark.parametrize(("n", "numerals"), CHINESE.items())
def test_number_to_chinese(n, numerals):
    assert number_to_chinese(n) == numerals


@pytest.mark.parametrize(("n", "numerals"), JAPANESE.items())
def test_number_to_japanese(n, numerals):
    assert number_to_japanese(n) == numerals


@pytest.mark.parametrize("convert", [number_to_english, number_to_chinese, number_to_japanese])
@pytest.mark.parametrize("n", [-1, 10**12])
def test_numbers_out_of_range_are_rejected(convert, n):
    with pytest.raises(ValueError):
        convert(n)


def test_same_seed_same_data_and_different_seed_different_data():
    assert generate_demo_data(seed=3, **SMALL) == generate_demo_data(seed=3, **SMALL)
    assert generate_demo_data(seed=3, **SMALL) != generate_demo_data(seed=4, **SMALL)


def test_datasets_differ_from_each_other():
    data = generate_demo_data(**SMALL)
    outputs = {name: [r["output"] for r in data[name]["train"]] for name in DEMO_DATASETS}
    assert outputs["en"] != outputs["zh"] != outputs["ja"] != outputs["en"]


def test_sizes_are_honoured():
    data = generate_demo_data(n_train=37, n_val=5, n_test=0)
    assert set(data) == set(DEMO_DATASETS) == {"en", "zh", "ja"}
    for splits in data.values():
        assert {split: len(rows) for split, rows in splits.items()} == {"train": 37, "val": 5, "test": 0}


@pytest.mark.parametrize("sizes", [{"n_train": -1}, {"n_train": 9000, "n_val": 600, "n_test": 600}])
def test_bad_sizes_are_rejected(sizes):
    with pytest.raises(ValueError):
        generate_demo_data(**sizes)


def test_default_sizes():
    for splits in generate_demo_data().values():
        assert [len(splits[s]) for s in ("train", "val", "test")] == [400, 50, 50]


def test_eval_splits_do_not_depend_on_train_size():
    small = generate_demo_data(n_train=10, n_val=20, n_test=20)
    large = generate_demo_data(**SMALL)
    for name in DEMO_DATASETS:
        assert small[name]["test"] == large[name]["test"] and small[name]["val"] == large[name]["val"]


def test_splits_are_disjoint():
    for splits in generate_demo_data().values():
        keys = {split: {(r["instruction"], r["input"]) for r in rows} for split, rows in splits.items()}
        assert len(keys["train"]) == 400  # no duplicates inside a split either
        assert not keys["train"] & keys["val"]
        assert not keys["train"] & keys["test"]
        assert not keys["val"] & keys["test"]


def test_rows_are_short_alpaca_rows_half_numbers_half_dates():
    for splits in generate_demo_data(n_train=400, n_val=51, n_test=50).values():
        for rows in splits.values():
            assert all(set(r) == {"instruction", "input", "output"} for r in rows)
            assert all(isinstance(v, str) and v for r in rows for v in (r["instruction"], r["output"]))
            assert all(len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 120 for r in rows)
            assert sum(bool(r["input"]) for r in rows) == len(rows) // 2  # dates carry the ISO input


def test_every_row_passes_check_answer_and_wrong_answers_fail():
    for name, splits in generate_demo_data().items():
        for rows in splits.values():
            for row in rows:
                assert check_answer(name, row, row["output"])
                assert check_answer(name, row, f"  {row['output']}\n")
                assert not check_answer(name, row, row["output"] + "。")
                assert not check_answer(name, row, row["output"][:-1])
                assert not check_answer(name, row, "")


def test_check_answer_recomputes_instead_of_trusting_output():
    row = {"instruction": "用汉字写出数字 110。", "input": "", "output": "百十"}
    assert check_answer("zh", row, "一百一十")
    assert not check_answer("zh", row, "百十")
    assert check_answer("ja", {**row, "instruction": "110を漢数字で書いてください。"}, "百十")


@pytest.mark.parametrize(("dataset", "answer"), [("en", "July 15, 2023"), ("zh", "2023年7月15日"),
                                                 ("ja", "2023年7月15日")])
def test_check_answer_on_dates(dataset, answer):
    row = {"instruction": "Write this date in words.", "input": "2023-07-15", "output": "ignored"}
    assert check_answer(dataset, row, answer)
    assert not check_answer(dataset, row, "2023-07-15")


def test_check_answer_rejects_unknown_dataset_and_rows_without_a_value():
    row = {"instruction": "Write the number 5 in words.", "input": "", "output": "five"}
    with pytest.raises(ValueError):
        check_answer("fr", row, "cinq")
    with pytest.raises(ValueError):
        check_answer("en", {**row, "instruction": "Write a number in words."}, "five")


def test_write_demo_data_round_trips(tmp_path):
    paths = write_demo_data(tmp_path / "demo", seed=1, **SMALL)
    expected = generate_demo_data(seed=1, **SMALL)
    assert set(paths) == set(DEMO_DATASETS)
    for name, split_paths in paths.items():
        assert set(split_paths) == {"train", "val", "test"}
        for split, path in split_paths.items():
            assert path == tmp_path / "demo" / name / f"{split}.jsonl"
            text = path.read_text(encoding="utf-8")
            lines = text.splitlines()
            assert text.endswith("\n") and len(lines) == len(expected[name][split])
            assert [json.loads(line) for line in lines] == expected[name][split]
    zh_text = paths["zh"]["train"].read_text(encoding="utf-8")
    assert "年" in zh_text and "\\u" not in zh_text  # raw UTF-8, not \u escapes
    leftovers = sorted(p.name for p in (tmp_path / "demo" / "ja").iterdir())
    assert leftovers == ["test.jsonl", "train.jsonl", "val.jsonl"]  # no temp files left behind


def test_write_demo_data_overwrites_existing_files(tmp_path):
    write_demo_data(tmp_path, seed=0, n_train=5, n_val=1, n_test=1)
    paths = write_demo_data(tmp_path, seed=0, n_train=3, n_val=1, n_test=1)
    assert len(paths["en"]["train"].read_text(encoding="utf-8").splitlines()) == 3
