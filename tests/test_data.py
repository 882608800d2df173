"""Data: answer-only masking, formats and bad rows, truncation, the tokenized cache, statistics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CHATML_TEMPLATE, make_tiny_model_dir, write_json, write_jsonl
from loraplex.data import prepare
from loraplex.data.formats import read_conversations, to_messages
from loraplex.data.render import FALLBACK_TEMPLATES, IGNORE_INDEX, chat_template_for, encode
from loraplex.errors import DataError
from loraplex.recipe import load_recipe


def trained_runs(tokenizer, enc) -> list[str]:
    """Decode each contiguous run of tokens whose label is not IGNORE_INDEX."""
    runs: list[list[int]] = []
    previous_trained = False
    for token, label in zip(enc.input_ids, enc.labels):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token  # a trained label is the token itself
            if previous_trained:
                runs[-1].append(token)
            else:
                runs.append([token])
        previous_trained = trained
    return [tokenizer.decode(run) for run in runs]


def alpaca(i: int = 0, **extra) -> dict:
    return {"instruction": f"question {i}", "input": "", "output": f"answer {i}", **extra}


def recipe_for(path, overrides=None, **entry):
    paths = [str(p) for p in path] if isinstance(path, list) else str(path)
    return load_recipe({"datasets": [{"name": "ds", "path": paths, **entry}]}, overrides)


def prepared(path, tokenizer, overrides=None, **entry):
    recipe = recipe_for(path, overrides, **entry)
    return prepare.prepare_dataset(recipe.datasets[0], recipe, tokenizer)


def data_error(path, tokenizer, **entry) -> DataError:
    with pytest.raises(DataError) as info:
        prepared(path, tokenizer, **entry)
    return info.value


# --------------------------------------------------------------------------- masking


def test_alpaca_row_with_input_trains_only_on_the_answer(tiny_tokenizer):
    row = {"instruction": "Translate to English", "input": "你好，世界", "output": "Hello, world."}
    messages = to_messages(row, "alpaca", {}, None)
    assert messages == [{"role": "user", "content": "Translate to English\n你好，世界"},
                        {"role": "assistant", "content": "Hello, world."}]
    enc = encode(tiny_tokenizer, messages, chat_template_for(tiny_tokenizer), 4096)
    assert trained_runs(tiny_tokenizer, enc) == ["Hello, world.<|im_end|>"]
    assert tiny_tokenizer.decode(enc.input_ids) == (
        "<|im_start|>user\nTranslate to English\n你好，世界<|im_end|>\n<|im_start|>assistant\nHello, world.<|im_end|>")
    assert enc.full_length == len(enc.input_ids)


def test_alpaca_row_with_history_trains_on_every_answer(tiny_tokenizer):
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.",
           "history": [["What is 1+1?", "2"], ["And 2+2?", "It is 4.\n"]]}
    messages = to_messages(row, "alpaca", {}, None)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    enc = encode(tiny_tokenizer, messages, chat_template_for(tiny_tokenizer), 4096)
    assert trained_runs(tiny_tokenizer, enc) == ["2<|im_end|>", "It is 4.\n<|im_end|>", "6<|im_end|>"]


def test_three_turn_messages_row(tiny_tokenizer):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"},
                {"role": "user", "content": "一个汉字"}, {"role": "assistant", "content": "字"}]
    enc = encode(tiny_tokenizer, messages, chat_template_for(tiny_tokenizer), 4096)
    runs = trained_runs(tiny_tokenizer, enc)
    assert runs == ["Hello!<|im_end|>", "Blue<|im_end|>", "字<|im_end|>"]
    assert enc.answer_tokens == sum(len(tiny_tokenizer(r, add_special_tokens=False)["input_ids"]) for r in runs)
    # the untrained tokens are exactly the rendered prompt parts
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(enc.input_ids) == rendered.rstrip("\n")


def test_llama3_fallback_template_trains_through_eot(tiny_tokenizer):
    template = chat_template_for(tiny_tokenizer, "llama3")
    assert template == FALLBACK_TEMPLATES["llama3"]
    alpaca_row = to_messages({"instruction": "Q", "input": "ctx", "output": "A1"}, "alpaca", {}, None)
    history_row = to_messages({"instruction": "Q2", "output": "A2", "history": [["Q1", "A1"]]}, "alpaca", {}, None)
    chat = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "u3"}, {"role": "assistant", "content": "a3"}]
    for messages, expected in [(alpaca_row, ["A1"]), (history_row, ["A1", "A2"]), (chat, ["a1", "a2", "a3"])]:
        enc = encode(tiny_tokenizer, messages, template, 4096)
        assert trained_runs(tiny_tokenizer, enc) == [f"{text}<|eot_id|>" for text in expected]
        assert tiny_tokenizer.decode(enc.input_ids).startswith("<|begin_of_text|><|start_header_id|>")


def test_tokenizer_without_chat_template_falls_back_to_chatml(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model_dir(tmp_path / "plain", chat_template=None))
    assert not tokenizer.chat_template
    assert chat_template_for(tokenizer) == FALLBACK_TEMPLATES["chatml"]
    path = write_json(tmp_path / "d.json", [alpaca(i) for i in range(4)])
    data = prepared(path, tokenizer, val_size=0)
    row = data.train[0]
    enc = type("Enc", (), {"input_ids": row["input_ids"], "labels": row["labels"]})
    assert trained_runs(tokenizer, enc) == ["answer 0<|im_end|>"]
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>user\nquestion 0<|im_end|>")


# --------------------------------------------------------------------------- truncation


def _prompt_tokens(tokenizer, instruction: str) -> int:
    messages = [{"role": "user", "content": instruction}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_truncation_drops_fully_cut_answers_and_keeps_partly_cut_ones(tmp_path, tiny_tokenizer):
    max_len = 64
    long_q = "x" * 60                     # prompt alone is longer than max_seq_length
    mid_q = "y" * (max_len - _prompt_tokens(tiny_tokenizer, "") - 3)  # 3 answer tokens fit
    assert _prompt_tokens(tiny_tokenizer, long_q) > max_len
    rows = [{"instruction": long_q, "output": "answer"}, {"instruction": mid_q, "output": "answer"},
            {"instruction": "short", "output": "answer"}]
    data = prepared(write_json(tmp_path / "d.json", rows), tiny_tokenizer, max_seq_length=max_len, val_size=0)
    stats = data.stats
    assert (stats["rows"], stats["train"], stats["val"]) == (3, 2, 0)
    assert stats["dropped"] == 1
    assert stats["truncated"] == 1  # kept but cut; the dropped one is counted as dropped only
    kept = sorted(data.train, key=lambda r: -r["length"])
    assert kept[0]["length"] == max_len and kept[0]["answer_tokens"] == 3
    answer = [t for t, label in zip(kept[0]["input_ids"], kept[0]["labels"]) if label != -100]
    assert tiny_tokenizer.decode(answer) == "ans"
    assert stats["length_max"] > max_len


def test_every_example_dropped_is_a_clear_error(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "z" * 80, "output": "answer"}] * 2
    err = data_error(write_json(tmp_path / "d.json", rows), tiny_tokenizer, max_seq_length=32)
    assert err.problems == ["dataset 'ds': no usable training example left (2 dropped because "
                            "max_seq_length=32 cuts off every answer); raise max_seq_length"]


def test_every_row_bad_and_skipped_does_not_blame_max_seq_length(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": ""}, {"instruction": "q"}])
    err = data_error(path, tiny_tokenizer, format="alpaca", on_bad_rows="skip")
    (line,) = err.problems
    assert line.startswith("dataset 'ds': no usable training example left")
    assert "2 bad row(s) of 2 skipped" in line and "on_bad_rows: error" in line
    assert "raise max_seq_length" not in line


# --------------------------------------------------------------------------- formats


def test_format_detection(tmp_path):
    a = read_conversations([write_json(tmp_path / "a.json", [alpaca(1)])])
    assert a.format == "alpaca" and a.rows == 1
    assert a.conversations[0].messages[-1] == {"role": "assistant", "content": "answer 1"}
    assert a.conversations[0].source == f"{tmp_path / 'a.json'} row 1"
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    m = read_conversations([write_jsonl(tmp_path / "m.jsonl", chat)])
    assert m.format == "messages" and m.conversations[0].source == f"{tmp_path / 'm.jsonl'} line 1"
    # a recipe-level system prompt is added only to rows without one
    s = read_conversations([tmp_path / "m.jsonl"], system="SYS")
    assert s.conversations[0].messages[0] == {"role": "system", "content": "SYS"}


def test_undetectable_format_names_file_row_and_fix(tmp_path):
    path = write_json(tmp_path / "qa.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        read_conversations([path])
    (line,) = info.value.problems
    assert line.startswith(f"{path} row 1: cannot detect the format from the fields ['answer', 'question']")
    assert "set format: alpaca" in line and "columns:" in line


def test_bad_rows_are_listed_with_their_lines(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([
        json.dumps(alpaca(1)),
        '{"instruction": "broken", ',
        json.dumps({"instruction": "no answer"}),
        json.dumps({"instruction": 5, "output": "x"}),
        json.dumps({"instruction": "q", "output": "   "}),
        json.dumps({"instruction": "q", "output": "a", "history": "oops"}),
        json.dumps(alpaca(2)),
    ]) + "\n", encoding="utf-8")
    err = data_error(path, tiny_tokenizer)
    assert err.title == "dataset 'ds': 5 bad row(s) of 7"
    assert err.problems[0] == f"{path} line 2: invalid JSON (Expecting property name enclosed in double quotes " \
                              "at column 27)"
    assert err.problems[1:5] == [
        f"{path} line 3: missing field 'output'",
        f"{path} line 4: field 'instruction' must be a string, got int 5",
        f"{path} line 5: field 'output' is empty: no answer to train on",
        f"{path} line 6: field 'history' must be a list of [user, assistant] string pairs, got 'oops'",
    ]
    assert err.problems[-1] == ("fix these rows, or set on_bad_rows: skip for dataset 'ds' to skip them "
                                "(they are counted)")

    data = prepared(path, tiny_tokenizer, on_bad_rows="skip", val_size=0)
    assert (data.stats["rows"], data.stats["bad_rows"], data.stats["train"]) == (7, 5, 2)


def test_bad_messages_rows(tmp_path):
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [ok,
            {"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
            {"messages": []},
            {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                          {"role": "assistant", "content": "a"}]},
            ["not", "an", "object"]]
    result = read_conversations([write_jsonl(tmp_path / "m.jsonl", rows)])
    assert len(result.conversations) == 1
    assert [str(b).split(": ", 1)[1] for b in result.bad_rows] == [
        "messages[0].role is 'human'; use one of system, user, assistant",
        "the last message of 'messages' must be the assistant's answer",
        "messages[1].content must be a string, got list ['a']",
        "field 'messages' must be a non-empty list of {role, content} objects, got []",
        "messages[1] is a system message; only the first message may be one",
        "a row must be a JSON object, got list ['not', 'an', 'object']",
    ]


@pytest.mark.parametrize("content, expected", [
    (b'{"data": [{"instruction": "q", "output": "a"}]}',
     "holds a JSON object, but a dataset is a list of rows; the rows may be under 'data': extract that list"),
    (b"", "file is empty; it needs at least one row"),
    (b"  \n", "file is empty; it needs at least one row"),
    (b'[{"instruction": "q", "output": "caf\xe9"}]', "not UTF-8 (line 1, byte 36); re-save the file as UTF-8"),
    (b'{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "b"}\n',
     "this looks like JSON Lines (one object per line); rename it to .jsonl"),
    (b'[{"instruction": "q", "output": "a"},\n]', "invalid JSON at line 2, column 1"),
    (b'"just a string"', "holds a JSON str, but a dataset is a list of rows"),
])
def test_unreadable_file_messages(tmp_path, tiny_tokenizer, content, expected):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    err = data_error(path, tiny_tokenizer)
    assert err.problems == [f"dataset 'ds': {path}: {expected}"] or (
        len(err.problems) == 1 and err.problems[0].startswith(f"dataset 'ds': {path}: {expected}"))


def test_unsupported_extension(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("q\ta\n", encoding="utf-8")
    assert data_error(path, tiny_tokenizer).problems == [
        f"dataset 'ds': {path}: unsupported file type '.txt'; use .json, .jsonl, .parquet, .csv, .arrow, "
        "a save_to_disk folder or hf:owner/name[:split]"]


def test_parquet_and_csv_files_load(tmp_path, tiny_tokenizer):
    import datasets

    rows = [alpaca(i) for i in range(5)]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    csv = read_conversations([tmp_path / "d.csv"])
    assert csv.format == "alpaca" and not csv.bad_rows
    assert csv.conversations[2].messages == [{"role": "user", "content": "question 2"},
                                             {"role": "assistant", "content": "answer 2"}]
    chat = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    datasets.Dataset.from_list(chat).to_parquet(str(tmp_path / "m.parquet"))
    pq = read_conversations([tmp_path / "m.parquet"])
    assert pq.format == "messages" and not pq.bad_rows
    assert pq.conversations[4].messages[-1] == {"role": "assistant", "content": "a4"}
    assert pq.conversations[4].source == f"{tmp_path / 'm.parquet'} row 5"
    # numeric-looking CSV columns stay text (an answer "42" is not an int)
    (tmp_path / "n.csv").write_text("instruction,input,output\nwhat is 6*7,,42\nwhat is 1+1,,2\n", encoding="utf-8")
    numeric = read_conversations([tmp_path / "n.csv"])
    assert not numeric.bad_rows
    assert [c.messages[-1]["content"] for c in numeric.conversations] == ["42", "2"]
    # several files of one dataset are concatenated
    data = prepared([tmp_path / "d.csv", tmp_path / "d.csv"], tiny_tokenizer, val_size=0)
    assert data.stats["rows"] == data.stats["train"] == 10


def test_column_mapping(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"q{i}", "answer": f"a{i}", "ctx": "c" if i == 0 else None} for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = read_conversations([path], columns={"instruction": "prompt", "output": "answer", "input": "ctx"})
    assert result.format == "alpaca"
    assert result.conversations[0].messages == [{"role": "user", "content": "q0\nc"},
                                                {"role": "assistant", "content": "a0"}]
    data = prepared(path, tiny_tokenizer, columns={"instruction": "prompt", "output": "answer"}, val_size=0)
    assert data.stats["train"] == 3
    # a missing mapped column names the mapped name
    bad = write_jsonl(tmp_path / "bad.jsonl", rows + [{"prompt": "q"}])
    result = read_conversations([bad], columns={"instruction": "prompt", "output": "answer"})
    assert [str(b) for b in result.bad_rows] == [f"{bad} line 4: missing field 'answer'"]


# --------------------------------------------------------------------------- cache


def test_cache_is_reused_and_invalidated(tmp_path, tiny_tokenizer, monkeypatch):
    from transformers import AutoTokenizer

    path = write_json(tmp_path / "d.json", [alpaca(i) for i in range(10)])
    first = prepared(path, tiny_tokenizer)
    assert (first.cache_dir / prepare.COMPLETE_MARKER).is_file()

    real_build = prepare._build_cache
    builds: list[Path] = []

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cache rebuilt")

    monkeypatch.setattr(prepare, "_build_cache", no_rebuild)
    second = prepared(path, tiny_tokenizer)
    assert second.cache_dir == first.cache_dir and second.stats == first.stats
    assert second.train["input_ids"] == first.train["input_ids"]

    def counting_build(spec, recipe, tokenizer, template, cache_dir, *rest):
        builds.append(cache_dir)
        real_build(spec, recipe, tokenizer, template, cache_dir, *rest)

    monkeypatch.setattr(prepare, "_build_cache", counting_build)
    # one byte of the file changed
    path.write_text(path.read_text(encoding="utf-8").replace("answer 3", "answer 4"), encoding="utf-8")
    edited = prepared(path, tiny_tokenizer)
    assert edited.cache_dir != first.cache_dir and builds == [edited.cache_dir]
    assert edited.fingerprint != first.fingerprint
    # another chat template
    other_template = AutoTokenizer.from_pretrained(tiny_model_dir_of(tiny_tokenizer))
    other_template.chat_template = CHATML_TEMPLATE.replace("'\n' }}", "'\n\n' }}")
    assert prepared(path, other_template).cache_dir not in (first.cache_dir, edited.cache_dir)
    # another vocabulary
    added = AutoTokenizer.from_pretrained(tiny_model_dir_of(tiny_tokenizer))
    added.add_tokens(["<|extra|>"])
    assert prepare.tokenizer_fingerprint(added) != prepare.tokenizer_fingerprint(tiny_tokenizer)
    assert prepared(path, added).cache_dir not in builds[:-1] + [edited.cache_dir]
    # another max_seq_length
    shorter = prepared(path, tiny_tokenizer, ["datasets.ds.max_seq_length=512"])
    assert shorter.cache_dir != edited.cache_dir
    assert len(builds) == 4 and len(set(builds)) == 4
    # asking again for the edited version reuses it
    assert prepared(path, tiny_tokenizer).cache_dir == edited.cache_dir and len(builds) == 4


def tiny_model_dir_of(tokenizer) -> str:
    return tokenizer.name_or_path


def test_failed_build_leaves_no_cache(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(1), {"instruction": "q"}])
    data_error(path, tiny_tokenizer)
    data_dir = Path(prepare.loraplex_home()) / "data"
    assert not data_dir.exists() or not any(data_dir.iterdir())


# --------------------------------------------------------------------------- statistics and splits


def test_percentiles_and_recommended_length():
    values = list(range(1, 101))
    assert [prepare.percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert prepare.percentile([], 50) == 0
    assert prepare.recommended_max_seq_length([10] * 200) == 64
    assert prepare.recommended_max_seq_length([64] * 100) == 64
    assert prepare.recommended_max_seq_length([65] * 100) == 128
    # one long outlier among 200 is beyond p99 and does not raise the recommendation
    assert prepare.recommended_max_seq_length([100] * 199 + [5000]) == 128


def test_prepare_stats(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "q" * (5 * i), "output": "a" * (i + 1)} for i in range(1, 41)]
    data = prepared(write_json(tmp_path / "d.json", rows), tiny_tokenizer)
    stats = data.stats
    lengths = sorted(len(r["input_ids"]) for r in list(data.train) + list(data.val))
    assert stats["rows"] == 40 and stats["bad_rows"] == 0 and stats["format"] == "alpaca"
    assert stats["length_max"] == lengths[-1]
    assert stats["length_p50"] == lengths[19] and stats["length_p99"] == lengths[-1]
    assert stats["length_p50"] <= stats["length_p90"] <= stats["length_p99"] <= stats["length_max"]
    rec = stats["recommended_max_seq_length"]
    assert rec % 64 == 0 and stats["length_p99"] <= rec < stats["length_p99"] + 64
    assert stats["total_tokens"] == sum(lengths)
    assert stats["answer_tokens"] == sum(i + 2 for i in range(1, 41))  # answer + <|im_end|>
    assert stats["max_seq_length"] == 1024 and stats["truncated"] == stats["dropped"] == 0


def test_split_is_deterministic_and_by_content(tmp_path, tiny_tokenizer, monkeypatch):
    rows = [alpaca(i) for i in range(200)]
    path = write_json(tmp_path / "d.json", rows)
    data = prepared(path, tiny_tokenizer, val_size=0.1)
    assert data.stats["train"] + data.stats["val"] == 200 and 10 <= data.stats["val"] <= 30  # about 10%
    assert len(data.train) == data.stats["train"] and len(data.val) == data.stats["val"]
    assert set(data.train["source"]).isdisjoint(data.val["source"])
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "other-home"))  # rebuilt from scratch
    again = prepared(path, tiny_tokenizer, val_size=0.1)
    assert again.cache_dir != data.cache_dir
    assert again.val["source"] == data.val["source"]
    # a row's side follows its content, not its position or the seed: the file reversed holds out the same rows
    shuffled = prepared(write_json(tmp_path / "r.json", rows[::-1]), tiny_tokenizer, val_size=0.1,
                        train={"seed": 7})
    assert sorted(shuffled.val["input_ids"]) == sorted(data.val["input_ids"])
    quarter = prepared(path, tiny_tokenizer, val_size=0.25)
    assert set(data.val["source"]) < set(quarter.val["source"])  # a larger share holds out more of the same rows
    none = prepared(path, tiny_tokenizer, val_size=0)
    assert none.val is None and none.stats["train"] == 200
    few = [{"i": i} for i in range(10)]
    places = [i / 10 for i in range(10)]
    assert prepare.split_rows(few, places, 0.3) == (few[3:], few[:3])
    assert prepare.split_rows(few, places, 0.01) == (few[1:], few[:1])  # at least one held out
    assert prepare.split_rows(few, places, 0.3, held_out_elsewhere=0.5) == (few[5:], few[:3])
    assert prepare.split_rows(few, places, 0.99) == (few[9:], few[:9])  # at least one trained on
    assert prepare.split_rows(few[:1], places[:1], 0.5) == (few[:1], [])
    copies = [0.5, 0.5, 0.7, 0.7]  # two contents, each twice: copies share a side
    assert prepare.split_rows(few[:4], copies, 0.1) == (few[2:4], few[:2])


def test_datasets_on_one_file_hold_out_the_same_rows(tmp_path, tiny_tokenizer):
    """Two adapters on one file: a row held out for either is trained on by neither (else one adapter's held-out
    loss, or a merge's, would be measured on rows another adapter of the merge trained on)."""
    rows = [alpaca(i) for i in range(200)]
    path = write_json(tmp_path / "d.json", rows)
    entries = [{"name": "a", "path": str(path), "val_size": 0.1, "system": "Be brief."},
               {"name": "b", "path": str(path), "val_size": 0.2, "train": {"seed": 3}},
               {"name": "c", "path": str(path), "val_size": 0.1, "max_samples": 150}]
    recipe = load_recipe({"datasets": entries})
    data = prepare.prepare_all(recipe, tiny_tokenizer)
    held = {name: set(d.val["source"]) for name, d in data.items()}
    trained = {name: set(d.train["source"]) for name, d in data.items()}
    for name in data:
        for other in data:
            assert not (held[other] & trained[name]), (name, other)
    assert held["a"] < held["b"]
    assert data["a"].stats["held_out_elsewhere"] == len(held["b"] - held["a"])
    assert held["c"] <= held["a"]  # its first 150 rows, split by the same content hash


def test_val_path_is_used_instead_of_a_split(tmp_path, tiny_tokenizer):
    train = write_json(tmp_path / "train.json", [alpaca(i) for i in range(6)])
    val = write_jsonl(tmp_path / "val.jsonl", [alpaca(100 + i) for i in range(3)])
    data = prepared(train, tiny_tokenizer, val_path=str(val), val_size=0.5)
    assert (data.stats["rows"], data.stats["train"], data.stats["val"]) == (9, 6, 3)
    assert all(s.startswith(str(val)) for s in data.val["source"])
    assert all(s.startswith(str(train)) for s in data.train["source"])
    # editing the val file invalidates the cache too
    write_jsonl(val, [alpaca(100 + i) for i in range(4)])
    assert prepared(train, tiny_tokenizer, val_path=str(val)).stats["val"] == 4
