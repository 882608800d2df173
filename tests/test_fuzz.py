"""Property-based fuzzing of the data loader, the renderer and the recipe loader.

Contract under test: a loader either accepts its input, reports a bad row (BadRow, counted), or raises a
LoraplexError subclass with a message; never another exception, never a hang, never a row lost without
being counted. Budgets are fixed and small (derandomized) so the suite stays fast and reproducible.
"""
from __future__ import annotations

import contextlib
import json
import signal
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_json
from loraplex.data.formats import ROLES, read_conversations, to_messages
from loraplex.data.render import IGNORE_INDEX, chat_template_for, encode
from loraplex.errors import DataError, LoraplexError, RecipeError
from loraplex.recipe import Recipe, load_recipe

FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max_examples)

ROW_BUDGET, ENCODE_BUDGET, RECIPE_BUDGET, YAML_BUDGET, OVERRIDE_BUDGET = 150, 80, 120, 120, 80
SECONDS_PER_EXAMPLE = 20  # "never hangs": a generous bound on a loaded 2-core machine


@contextlib.contextmanager
def within(seconds: float):
    """Fail (instead of hanging) when the block runs longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- strategies

SPECIAL_TEXT = [
    "", " ", "\n", "你好，世界", "日本語のテキスト", "한국어", "👩‍💻🎉🇨🇳", "مرحبا بالعالم", "\u202eRTL override",
    "שלום", "\x00", "a\x00b", "\ud800", "x\udfffy", "\u2028", "\u2029", "\x85", "\ufeff", "\r\n", "\t",
    "<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>", "{{ messages }}", "{% raw %}", "\\u0000",
]
HAZARDS = ["\x00", "\ud800", "x\udfffy", "\u2028", "\x85", "<|im_end|>"]
any_char = st.characters(codec=None, categories=None, exclude_categories=())  # surrogates included
text = st.one_of(
    st.text(any_char, max_size=12),
    st.sampled_from(SPECIAL_TEXT),
    st.lists(st.one_of(st.sampled_from(SPECIAL_TEXT), st.text(any_char, max_size=4)), max_size=5).map("".join),
)
huge_text = st.sampled_from(["長", "a", "🎉", "\u0645"]).flatmap(
    lambda ch: st.integers(5_000, 120_000).map(lambda n: ch * n))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), text)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=12)
field_value = st.one_of(text, text, text, json_value, huge_text)

nonblank = st.tuples(st.sampled_from(["q ", "答", "🎉", "\u05e9"]), text).map("".join)
near_valid_alpaca = st.fixed_dictionaries({"instruction": nonblank, "output": nonblank}, optional={
    "input": text, "system": text,
    "history": st.lists(st.lists(st.one_of(st.sampled_from(HAZARDS), text), min_size=2, max_size=2), min_size=1,
                        max_size=3)})
any_alpaca = st.fixed_dictionaries({}, optional={
    "instruction": field_value, "input": field_value, "output": field_value, "system": field_value,
    "history": st.one_of(json_value, st.lists(st.lists(text, min_size=2, max_size=2), min_size=1, max_size=3),
                         st.lists(st.lists(field_value, min_size=2, max_size=2), max_size=3)),
})
alpaca_row = st.one_of(near_valid_alpaca, any_alpaca)
message = st.one_of(
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(ROLES), text), "content": field_value}),
    json_value)
messages_row = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=5), json_value)}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant"]), "content": text}), min_size=1, max_size=6)}))
row = st.one_of(alpaca_row, alpaca_row, messages_row, messages_row, json_value)


def write_rows(path: Path, rows: list, ensure_ascii: bool) -> None:
    """One row per line (.jsonl) or a list (.json); raw lone surrogates become invalid UTF-8 bytes."""
    if path.suffix == ".jsonl":
        text_ = "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows)
    else:
        text_ = json.dumps(rows, ensure_ascii=ensure_ascii, indent=1)
    path.write_bytes(text_.encode("utf-8", errors="surrogatepass"))


# --------------------------------------------------------------------------- data loader


@fuzz(ROW_BUDGET)
@given(rows=st.lists(row, min_size=1, max_size=6), suffix=st.sampled_from([".jsonl", ".json"]),
       fmt=st.sampled_from(["auto", "alpaca", "messages"]), ensure_ascii=st.booleans())
def test_read_conversations_accepts_reports_or_raises(rows, suffix, fmt, ensure_ascii):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        write_rows(path, rows, ensure_ascii)
        try:
            with within(SECONDS_PER_EXAMPLE):
                result = read_conversations([path], fmt)
        except LoraplexError as exc:
            assert isinstance(exc, DataError)
            assert exc.problems and all(str(path) in p for p in exc.problems), exc.problems
            return
    # nothing dropped silently: every row of the file is a conversation or a counted bad row, once
    assert result.rows == len(rows)
    assert len(result.conversations) + len(result.bad_rows) == result.rows
    unit = "line" if suffix == ".jsonl" else "row"
    places = [c.source.rsplit(" ", 2)[-2:] for c in result.conversations] + \
             [b.where.split(" ") for b in result.bad_rows]
    assert sorted(int(n) for u, n in places if u == unit) == list(range(1, len(rows) + 1))
    for bad in result.bad_rows:
        assert bad.problem and bad.file == str(path)
    for conv in result.conversations:
        assert conv.messages[-1]["role"] == "assistant"
        for m in conv.messages:
            assert m["role"] in ROLES and isinstance(m["content"], str) and "\x00" not in m["content"]
            m["content"].encode("utf-8")  # no lone surrogate gets through


@fuzz(ENCODE_BUDGET)
@given(conv_row=st.one_of(alpaca_row, messages_row), max_seq_length=st.integers(1, 600))
def test_encode_accepted_rows_masks_exactly(tiny_tokenizer, conv_row, max_seq_length):
    fmt = "messages" if "messages" in conv_row else "alpaca"
    try:
        messages = to_messages(conv_row, fmt, {}, None)
    except ValueError:
        return  # reported as a BadRow by read_conversations (covered above)
    template = chat_template_for(tiny_tokenizer)
    with within(SECONDS_PER_EXAMPLE):
        enc = encode(tiny_tokenizer, messages, template, max_seq_length)
    assert len(enc.input_ids) == len(enc.labels) == min(enc.full_length, max_seq_length)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(enc.input_ids, enc.labels))
    if enc.full_length <= max_seq_length:
        # untruncated: the trained tokens are exactly each answer and its end-of-turn token, in order
        trained = tiny_tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])
        assert trained == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


# --------------------------------------------------------------------------- recipe loader


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-recipes")
    write_json(folder / "ok.json", [{"instruction": "q", "output": "a"}])
    return folder


def recipe_key(keys: list[str]):
    return st.one_of(st.sampled_from(keys), text)


lora_block = st.dictionaries(recipe_key(["r", "alpha", "dropout", "bias", "use_rslora", "use_dora",
                                         "layers_to_transform"]), json_value, max_size=4)
train_block = st.dictionaries(recipe_key(["epochs", "max_steps", "lr", "batch_size", "grad_accum", "seed",
                                          "scheduler", "save_steps", "packing"]), json_value, max_size=4)
dataset_entry = st.one_of(json_value, st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["zh", "en", "a/b", "../x", ".", ""]), json_value)},
    optional={"path": st.one_of(st.just("ok.json"), st.just("missing.json"), json_value),
              "format": json_value, "max_seq_length": json_value, "val_size": json_value,
              "target_modules": st.one_of(st.just("all-linear"), st.lists(text, max_size=3), json_value),
              "columns": st.one_of(st.dictionaries(text, text, max_size=3), json_value),
              "lora": st.one_of(lora_block, json_value), "train": st.one_of(train_block, json_value),
              **{k: json_value for k in ("val_path", "test_path", "on_bad_rows", "template", "system")}}))
recipe_dict = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.dictionaries(recipe_key(["path", "dtype", "gguf_file", "trust_remote_code"]),
                                       json_value, max_size=3), json_value),
    "run_name": st.one_of(st.sampled_from(["ok", "../x", "a/b", ""]), json_value),
    "output_dir": json_value,
    "defaults": st.one_of(st.dictionaries(recipe_key(["lora", "train", "max_seq_length", "name"]),
                                          st.one_of(lora_block, json_value), max_size=3), json_value),
    "datasets": st.one_of(st.lists(dataset_entry, max_size=3), json_value),
}).flatmap(lambda d: st.dictionaries(text, json_value, max_size=2).map(lambda extra: {**extra, **d}))


def assert_loads_or_explains(source, overrides=None) -> None:
    try:
        with within(SECONDS_PER_EXAMPLE):
            recipe = load_recipe(source, overrides)
    except RecipeError as exc:
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems)
        return
    assert isinstance(recipe, Recipe) and recipe.datasets


@fuzz(RECIPE_BUDGET)
@given(raw=recipe_dict)
def test_recipe_dicts_load_or_explain(data_dir, monkeypatch, raw):
    monkeypatch.chdir(data_dir)  # relative 'ok.json' resolves for dict recipes
    assert_loads_or_explains(raw)


CRAFTED_YAML = [  # shapes random text rarely reaches: non-text keys, anchors and cycles, tags, dates
    "defaults: {1: 2}\ndatasets: [{name: a, path: ok.json}]\n",
    "1: 2\ndatasets: [{name: a, path: ok.json}]\n",
    "datasets: [{name: a, path: ok.json, lora: {1: 2}, columns: {1: x}}]\n",
    "datasets: &a [*a]\n",
    "datasets: [{name: a, path: ok.json, train: &b {x: *b}}]\n",
    "defaults: &d {lora: *d}\ndatasets: [{name: a, path: ok.json}]\n",
    "datasets: [{name: 2020-01-01, path: [ok.json, {x: 1}]}]\n",
    "model: {path: !!binary aGVsbG8=}\ndatasets: [{name: a, path: ok.json}]\n",
    "model: !!python/object/apply:os.system [echo pwned]\n",
    "datasets: [{name: a, path: ok.json, lora: {r: .inf, alpha: .nan}, train: {epochs: [1], lr: abc}}]\n",
    "? [a, b]\n: 1\n",
    "\ufeffdatasets: [{name: a, path: ok.json}]\n",
    "datasets:\n- name: a\n  path: ok.json\n\t lora: {}\n",
]
yaml_text = st.one_of(
    st.sampled_from(CRAFTED_YAML),
    st.text(st.one_of(st.sampled_from(list(":-[]{}&*!|>'\"#%@`?,\n ")), any_char), max_size=80),
    recipe_dict.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    recipe_dict.map(lambda d: yaml.safe_dump(d)).flatmap(
        lambda s: st.integers(0, len(s)).map(lambda cut: s[:cut])),  # truncated recipes
)


@fuzz(YAML_BUDGET)
@given(source=yaml_text, raw_bytes=st.booleans())
def test_recipe_yaml_text_loads_or_explains(data_dir, source, raw_bytes):
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", dir=data_dir, delete=False) as fh:
        fh.write(source.encode("utf-8", errors="surrogatepass" if raw_bytes else "backslashreplace"))
    try:
        assert_loads_or_explains(Path(fh.name))
    finally:
        Path(fh.name).unlink()


@pytest.mark.parametrize("source", CRAFTED_YAML, ids=range(len(CRAFTED_YAML)))
def test_crafted_yaml_loads_or_explains(data_dir, source):
    path = data_dir / "crafted.yaml"
    path.write_text(source, encoding="utf-8")
    assert_loads_or_explains(path)


override_value = st.one_of(text, st.sampled_from(["[", "{a: 1}", "- x", "&a [*a]", "!!python/object:os.system x",
                                                   "1e999", ".nan", "-.inf", "null", "~", "[q_proj]", "32"]))
dataset_override = st.tuples(
    st.sampled_from(["datasets", "defaults"]), st.sampled_from(["zh", "1", "7", "²", "٣", "x"]),
    st.sampled_from(["lora.r", "train.lr", "name", ""]), override_value,
).map(lambda p: ".".join(x for x in p[:3] if x) + "=" + p[3])
override = st.one_of(
    dataset_override, dataset_override,
    st.tuples(st.lists(st.one_of(st.sampled_from(["datasets", "defaults", "model", "zh", "0", "7", "²", "lora",
                                                  "train", "r", "lr", "name", "path"]), text), max_size=5),
              override_value)
    .map(lambda kv: ".".join(kv[0]) + "=" + kv[1]),
    text)


@fuzz(OVERRIDE_BUDGET)
@given(overrides=st.lists(override, min_size=1, max_size=3))
def test_overrides_load_or_explain(data_dir, overrides):
    raw = {"defaults": {"lora": {"r": 4}}, "datasets": [{"name": "zh", "path": str(data_dir / "ok.json")}]}
    assert_loads_or_explains(raw, overrides)


def test_loaded_recipe_never_holds_a_non_finite_float(data_dir):
    """.inf / .nan pass a `gt=0` check unless refused: lr=.inf would train into NaN."""
    for value in (".inf", ".nan", "-.inf"):
        with pytest.raises(RecipeError, match="finite"):
            load_recipe({"datasets": [{"name": "zh", "path": str(data_dir / "ok.json")}]},
                        [f"defaults.train.lr={value}"])
