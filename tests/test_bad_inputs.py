"""A catalogue of bad inputs, end to end through the CLI: each gets exit code 2 and one message that names
the file, the row/line or field, the bad value and the fix; no traceback unless LORAPLEX_DEBUG=1.

Plus the two checks that need a trained adapter or a diverging loss: an adapter loaded on another base
model, and a NaN loss that stops training with the step, the batch's rows and the last checkpoint.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import make_tiny_model_dir, write_json, write_jsonl
from loraplex import cli
from loraplex.errors import LoraplexError, ModelError

runner = CliRunner()
ALPACA = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(6)]
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_ROWS_FIX = "fix these rows, or set on_bad_rows: skip for dataset 'd' to skip them (they are counted)"




def write_gguf(path: Path, arch: str) -> Path:
    """A small but valid GGUF file of the given architecture (one tensor, no tokenizer)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --------------------------------------------------------------------------- the catalogue
# Each case: (setup, expected). `setup(tmp, model_dir)` writes files and returns (dataset entry, model block,
# raw YAML text or None); the expected parts of the output are formatted with {tmp} and {recipe}.


def entry(path="d.json", **fields) -> dict:
    return {"name": "d", "path": path, **fields}


def case_data(filename: str, content: bytes | list, **fields) -> Callable:
    def setup(tmp: Path, model_dir: Path):
        if isinstance(content, list):
            (write_jsonl if filename.endswith(".jsonl") else write_json)(tmp / filename, content)
        else:
            (tmp / filename).write_bytes(content)
        return entry(filename, **fields), {}, None
    return setup


def case_entry(**fields) -> Callable:
    def setup(tmp: Path, model_dir: Path):
        write_json(tmp / "d.json", ALPACA)
        return entry(**fields), {}, None
    return setup


def case_yaml(text: str) -> Callable:
    def setup(tmp: Path, model_dir: Path):
        write_json(tmp / "d.json", ALPACA)
        return None, {}, text
    return setup


def case_model(make: Callable[[Path], str], **fields) -> Callable:
    def setup(tmp: Path, model_dir: Path):
        write_json(tmp / "d.json", ALPACA)
        return entry(**fields), {"path": make(tmp)}, None
    return setup


STRICT_TEMPLATE = (  # like Llama-2 / Mistral templates: no system role
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def not_a_model(tmp: Path) -> str:
    (tmp / "weights").mkdir()
    (tmp / "weights" / "notes.txt").write_text("not a model", encoding="utf-8")
    return "weights"


def truncated_gguf(tmp: Path) -> str:
    data = write_gguf(tmp / "full.gguf", "llama").read_bytes()
    (tmp / "partial.gguf").write_bytes(data[:40])  # an interrupted download
    return "partial.gguf"


def garbage_gguf(tmp: Path) -> str:
    (tmp / "model.gguf").write_bytes(b"<html>404 Not Found</html>" * 8)
    return "model.gguf"


CATALOGUE = {
    "malformed-yaml": (
        case_yaml("datasets:\n  - name: d\n    path: d.json\n   lora: {r: 4}\n"),
        ["{recipe}:4:", "malformed YAML (expected <block end>, but found '<block mapping start>'); "
                        "check the indentation and quoting there"]),
    "unknown-key": (
        case_entry(max_seq_len=512),
        ["recipe is invalid:", "  - datasets[d].max_seq_len: unknown key 'max_seq_len'; did you mean "
                               "'max_seq_length'? known: name, path,"]),
    "r-is-text": (
        case_entry(lora={"r": "abc"}),
        ["  - datasets[d].lora.r: must be a whole number, e.g. 16 (no quotes) (got 'abc')"]),
    "epochs-is-a-list": (
        case_entry(train={"epochs": [1]}),
        ["  - datasets[d].train.epochs: must be a number, e.g. 3 or 2.0e-4 (got [1])"]),
    "lr-is-infinite": (
        case_entry(train={"lr": float("inf")}),
        ["  - datasets[d].train.lr: must be a finite number, not .inf or .nan (got inf)"]),
    "data-file-missing": (
        case_entry(path="nope.json"),
        ["  - datasets[d].path: file {tmp}/nope.json does not exist; check the path (relative paths start at "
         "the recipe's folder)"]),
    "data-file-empty": (
        case_data("d.json", b""),
        ["  - dataset 'd': {tmp}/d.json: file is empty; it needs at least one row"]),
    "data-file-not-utf8": (
        case_data("d.jsonl", b'{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "caf\xe9"}\n'),
        ["  - dataset 'd': {tmp}/d.jsonl: not UTF-8 (line 2, byte 71); re-save the file as UTF-8"]),
    "invalid-json-at-line": (
        case_data("d.json", b'[\n {"instruction": "q", "output": "a"},\n {"instruction": "q" "output": "a"}\n]\n'),
        ["  - dataset 'd': {tmp}/d.json: invalid JSON at line 3, column 22 (Expecting ',' delimiter); "
         "fix the syntax there"]),
    "invalid-jsonl-line": (
        case_data("d.jsonl", b'{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": \n'),
        ["  - dataset 'd': 1 bad row(s) of 2", "  - {tmp}/d.jsonl line 2: invalid JSON (Expecting value at column 32)",
         "  - " + BAD_ROWS_FIX]),
    "json-object-not-list": (
        case_data("d.json", b'{"data": [{"instruction": "q", "output": "a"}]}'),
        ["  - dataset 'd': {tmp}/d.json: holds a JSON object, but a dataset is a list of rows; the rows may be "
         "under 'data': extract that list"]),
    "mixed-formats": (
        case_data("d.jsonl", [ALPACA[0], CHAT, ALPACA[1]]),
        ["  - dataset 'd': 1 bad row(s) of 3",
         "  - {tmp}/d.jsonl line 2: missing field 'instruction' (this row is messages format but the dataset is "
         "alpaca; a dataset holds one format: move such rows to a dataset entry of their own)", "  - " + BAD_ROWS_FIX]),
    "missing-field": (
        case_data("d.jsonl", [ALPACA[0], {"instruction": "q"}]),
        ["  - {tmp}/d.jsonl line 2: missing field 'output'", "  - " + BAD_ROWS_FIX]),
    "non-string-field": (
        case_data("d.json", [ALPACA[0], {"instruction": 3, "output": "a"}]),
        ["  - {tmp}/d.json row 2: field 'instruction' must be a string, got int 3", "  - " + BAD_ROWS_FIX]),
    "non-string-message": (
        case_data("d.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}]),
        ["  - {tmp}/d.jsonl line 1: messages[1].content must be a string, got int 5", "  - " + BAD_ROWS_FIX]),
    "empty-answer": (
        case_data("d.jsonl", [ALPACA[0], {"instruction": "q", "output": "  "}]),
        ["  - {tmp}/d.jsonl line 2: field 'output' is empty: no answer to train on", "  - " + BAD_ROWS_FIX]),
    "max-seq-length-below-every-prompt": (
        case_entry(max_seq_length=8),
        ["  - dataset 'd': no usable training example left (6 dropped because max_seq_length=8 cuts off every "
         "answer); raise max_seq_length"]),
    "module-matches-nothing": (
        case_entry(target_modules=["down_porj"]),
        ["recipe does not fit the base model:", "  - datasets[d].target_modules: 'down_porj' is not a linear module "
         "of LlamaForCausalLM; did you mean 'down_proj'? available: q_proj, k_proj, v_proj, o_proj, gate_proj, "
         "up_proj, down_proj"]),
    "module-not-linear": (
        case_entry(target_modules=["q_proj", "mlp"]),
        ["  - datasets[d].target_modules: 'mlp' is a LlamaMLP in LlamaForCausalLM, not a linear layer; LoRA "
         "targets linear layers: q_proj, k_proj,"]),
    "r-larger-than-layer": (
        case_entry(target_modules=["k_proj"], lora={"r": 40}),
        ["  - datasets[d].lora.r: r=40 is larger than k_proj's smallest dimension (32); use r <= 32"]),
    "layers-beyond-model": (
        case_entry(lora={"layers_to_transform": [1, 2, 5]}),
        ["  - datasets[d].lora.layers_to_transform: [2, 5] out of range; LlamaForCausalLM has layers 0..1"]),
    "chat-template-refuses-rows": (
        case_model(lambda tmp: str(make_tiny_model_dir(tmp / "strict", chat_template=STRICT_TEMPLATE)),
                   system="Be brief."),
        ["error: the data cannot be prepared:", "  - {tmp}/d.json row 1: the chat template refused this conversation "
         "(TemplateError: System role not supported); fix the row, or set template: chatml (or llama3) for this "
         "dataset"]),
    "base-is-not-a-model": (
        case_model(not_a_model),
        ["error: model.path: {tmp}/weights is not a model folder (no config.json)"]),
    "base-path-is-nothing": (
        case_model(lambda tmp: "./no-such-model"),
        ["error: model.path: './no-such-model' is neither a model folder, a .gguf file nor a hub id (owner/name); "
         "check the path"]),
    "gguf-unsupported-architecture": (
        case_model(lambda tmp: write_gguf(tmp / "bert.gguf", "bert").name),
        ["error: cannot convert {tmp}/bert.gguf: GGUF model with architecture bert is not supported yet. It must be "
         "a complete GGUF file of an architecture transformers' GGUF loader supports (llama, mistral, qwen2, "
         "qwen3, gemma and a few more); re-download it, or set model.path to the model's HF folder or hub id"]),
    "gguf-garbage-bytes": (
        case_model(garbage_gguf),
        ["error: cannot convert {tmp}/model.gguf: ", "not a GGUF file", "re-download it, or set model.path"]),
    "gguf-truncated": (
        case_model(truncated_gguf),
        ["error: cannot convert {tmp}/partial.gguf: ", "re-download it, or set model.path"]),
}


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_gets_one_clear_message(name, tmp_path, tiny_model_dir, monkeypatch):
    setup, expected = CATALOGUE[name]
    dataset, model, text = setup(tmp_path, tiny_model_dir)
    recipe = tmp_path / "recipe.yaml"
    if text is None:
        raw = {"model": {"path": str(tiny_model_dir), **model}, "datasets": [dataset]}
        text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    recipe.write_text(text, encoding="utf-8")

    result = runner.invoke(cli.app, ["prepare", str(recipe)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")
    for line in expected:
        assert line.format(tmp=tmp_path, recipe=recipe) in result.output, result.output

    # the same input with LORAPLEX_DEBUG=1: the LoraplexError itself comes through, with its traceback
    monkeypatch.setenv("LORAPLEX_DEBUG", "1")
    debug = runner.invoke(cli.app, ["prepare", str(recipe)])
    assert isinstance(debug.exception, LoraplexError), debug.exception
    assert debug.exc_info[2] is not None


# --------------------------------------------------------------------------- the run folder


def small_recipe(tmp: Path, model_dir: Path, rows: list = ALPACA, **train) -> Path:
    write_json(tmp / "d.json", rows)
    raw = {"model": {"path": str(model_dir), "dtype": "float32"}, "run_name": "r", "output_dir": "out",
           "defaults": {"train": {"max_steps": 1, "batch_size": 2, **train}, "lora": {"r": 2, "alpha": 4}},
           "datasets": [entry()]}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("run_json", ['{"recipe_fingerprint": "0123456789abcdef", "base_model": "x"}\n',
                                      "{half a json", "[]"], ids=["another-recipe", "corrupt", "not-an-object"])
def test_output_dir_holding_another_run_json(run_json, tmp_path, tiny_model_dir):
    recipe = small_recipe(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "out" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(run_json, encoding="utf-8")
    (run_dir / "keep.txt").write_text("someone else's", encoding="utf-8")

    result = runner.invoke(cli.app, ["train", str(recipe)])
    if run_json.startswith('{"recipe_fingerprint"'):  # another recipe's run: its adapters are kept, nothing removed
        assert result.exit_code == 0, result.output
        assert (run_dir / "keep.txt").read_text(encoding="utf-8") == "someone else's"
        return
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    said = " ".join(result.output.split())
    assert f"error: {run_dir / 'run.json'} was not written by loraplex, so {run_dir} is not a loraplex run folder; " \
           "set another run_name or output_dir (nothing was changed)" in said
    # nothing was touched
    assert (run_dir / "run.json").read_text(encoding="utf-8") == run_json
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt", "run.json"]


# --------------------------------------------------------------------------- adapter from another base


def test_adapter_from_another_base_model_is_refused(tmp_path, tiny_model_dir):
    from loraplex import adapters
    from loraplex import train

    result = train(small_recipe(tmp_path, tiny_model_dir), progress=False)
    adapter_dir = result.run_dir / "adapters" / "d"
    other = make_tiny_model_dir(tmp_path / "other-llama", seed=1)  # same architecture, other weights

    with pytest.raises(ModelError) as info:
        adapters.load(str(other), {"d": adapter_dir}, dtype="float32")
    (line,) = info.value.problems
    recorded = result.adapters["d"]["base_fingerprint"]
    assert line.startswith(f"adapter 'd' ({adapter_dir}) was trained on {tiny_model_dir.name} (base fingerprint "
                           f"{recorded}), but the base loaded from {other} is other-llama (fingerprint ")
    assert line.endswith("); load it with the base it was trained on")
    # with its own base it loads
    assert adapters.load(str(tiny_model_dir), {"d": adapter_dir}, dtype="float32").names == ["d"]


# --------------------------------------------------------------------------- numerical faults


def test_nan_loss_stops_with_step_rows_and_last_checkpoint(tmp_path, tiny_model_dir):
    rows = ALPACA + ALPACA[:5]  # 11 rows: 1 held out, 10 in batches of 2
    # lr 1e38: Adam's first step moves B by ~1e38, so the next forward overflows float32
    recipe = small_recipe(tmp_path, tiny_model_dir, rows, max_steps=8, save_steps=1, lr=1e38, warmup_ratio=0)
    result = runner.invoke(cli.app, ["train", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    message = result.output.split("error: ", 1)[1].strip()  # after the progress bar
    match = re.match(r"the loss became (nan|inf|-inf) at step (\d+); the last checkpoint is kept: (\S+)\. Lower the "
                     r"learning rate \(train\.lr\) and train again, or check the data rows of this batch: (.+)$",
                     message)
    assert match, message
    step, checkpoint = int(match.group(2)), Path(match.group(3))
    assert step > 1 and checkpoint.name == f"checkpoint-{step - 1}"
    assert (checkpoint / "trainer_state.json").is_file()  # still on disk, loadable for --resume
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step - 1
    rows = re.fullmatch(rf"{re.escape(str(tmp_path / 'd.json'))} (row \d+(, )?)+", match.group(4))
    assert rows and match.group(4).count("row") == 2  # batch_size 2: both rows of the batch are named
    assert not (tmp_path / "out" / "r" / "adapters" / "d").exists()  # no adapter that looks finished
