"""Every precision on every machine: float32 and bfloat16 forced whatever this CPU runs natively, adapters that
move between a float32 host and a bfloat16 host, QLoRA in bfloat16, and the bugs those paths used to hide."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import loraplex.device
from conftest import make_tiny_model_dir, write_jsonl
from loraplex import adapters
from loraplex.errors import LoraplexError, RecipeError
from loraplex.models import load_model, resolve_base
from loraplex.recipe import load_recipe

ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "amber", "pilot"] * 8]
DTYPES = ["float32", "bfloat16"]


def recipe_for(tmp: Path, model_dir: Path, dtype: str = "float32", train: dict | None = None, **model) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    write_jsonl(tmp / "a.jsonl", ROWS)
    write_jsonl(tmp / "b.jsonl", list(reversed(ROWS)))
    train = {"epochs": 3, "lr": 3e-2, "batch_size": 8, "save_steps": 100, "logging_steps": 1, **(train or {})}
    return {"model": {"path": str(model_dir), "dtype": dtype, **model}, "output_dir": str(tmp / "runs"),
            "run_name": "p", "defaults": {"train": train, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "datasets": [{"name": "a", "path": str(tmp / "a.jsonl"), "target_modules": ["q_proj"]},
                         {"name": "b", "path": str(tmp / "b.jsonl"), "target_modules": ["v_proj"]}]}


def host(monkeypatch, bf16: bool) -> None:
    """Make `dtype: auto` pick what a CPU with (or without) native bfloat16 picks."""
    monkeypatch.setattr(loraplex.device, "bf16_supported", lambda: bf16)


IDS = torch.tensor([list(range(3, 40))])


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=IDS).logits.float()


# --------------------------------------------------------------------------- isolation, in each dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_isolation_check_sees_a_base_changed_while_an_adapter_trains(dtype, tiny_model_dir, tmp_path, monkeypatch):
    """The check compares the base in memory before and after each adapter: a change of one weight stops the run."""
    from loraplex.training import runner as run

    original = run.train_adapter

    def train_then_touch_the_base(model, *args, **kwargs):
        meta = original(model, *args, **kwargs)
        with torch.no_grad():
            model.get_submodule("model.layers.1.mlp.up_proj").weight[0, 0] += 0.01
        return meta

    monkeypatch.setattr(run, "train_adapter", train_then_touch_the_base)
    with pytest.raises(LoraplexError, match="the base weights changed while training 'a'"):
        run.train(recipe_for(tmp_path, tiny_model_dir, dtype, {"max_steps": 2}), progress=False)


# --------------------------------------------------------------------------- adapters between hosts


@pytest.fixture(scope="module", params=[False, True], ids=["trained-on-float32-host", "trained-on-bfloat16-host"])
def host_run(request, tiny_model_dir, tmp_path_factory):
    """A two-adapter run with `dtype: auto`, trained on a host that picks float32 or bfloat16."""
    from loraplex import train

    tmp = tmp_path_factory.mktemp("host")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(tmp / "home"))
        host(mp, request.param)
        result = train(recipe_for(tmp, tiny_model_dir, "auto"), progress=False)
    return request.param, result, tmp / "home"


def test_adapter_loads_on_the_other_host(host_run, tiny_model_dir, monkeypatch):
    trained_bf16, result, _ = host_run
    assert {m["dtype"] for m in result.adapters.values()} == {"bfloat16" if trained_bf16 else "float32"}
    dirs = {n: result.run_dir / "adapters" / n for n in ("a", "b")}
    host(monkeypatch, not trained_bf16)
    other = adapters.load(str(tiny_model_dir), dirs, dtype="auto")  # fingerprints checked in the trained dtype
    same = adapters.load(str(tiny_model_dir), dirs, dtype="bfloat16" if trained_bf16 else "float32")
    assert next(other.model.parameters()).dtype != next(same.model.parameters()).dtype
    for name in ("a", "b"):
        other_logits, same_logits = logits(other.use(name).model), logits(same.use(name).model)
        assert (other_logits - same_logits).abs().max() < 0.05 * same_logits.abs().max()  # bf16 rounding only
    # and a base that is not the adapters' is still refused from either host
    alien = make_tiny_model_dir(tiny_model_dir.parent / "alien-host", seed=7)
    with pytest.raises(LoraplexError, match="was trained on .* but the base loaded from"):
        adapters.load(str(alien), dirs, dtype="auto")


def test_run_evaluates_and_merges_on_the_other_host(host_run, tmp_path, monkeypatch):
    from loraplex.evaluation import evaluate_run
    from loraplex.merging import merge

    trained_bf16, result, home = host_run
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    host(monkeypatch, not trained_bf16)
    evaluation = evaluate_run(result.run_dir, generation={"enabled": False})
    for name, meta in result.adapters.items():
        assert evaluation.metrics[name][name]["loss"] == pytest.approx(meta["heldout_loss"], rel=0.05, abs=0.02)
    report = merge(result.run_dir, ["a", "b"], out_dir=tmp_path / "merged")
    assert report.verification["weights"]["max_relative"] < 1e-4


# --------------------------------------------------------------------------- QLoRA in bfloat16


def test_qlora_trains_in_bfloat16_and_its_adapters_load_in_either_dtype(tiny_model_dir, tmp_path):
    from loraplex import quantize
    from loraplex import train

    try:
        quantize.require_bitsandbytes("4bit")
    except LoraplexError as exc:
        pytest.skip(f"bitsandbytes cannot run 4-bit here: {exc.render()}")
    recipe = recipe_for(tmp_path, tiny_model_dir, "bfloat16", {"packed_attention": "masked"}, quantization="4bit")
    result = train(recipe, progress=False)  # the quantized base is fingerprinted before and after each adapter
    for name, meta in result.adapters.items():
        assert meta["quantization"] == "4bit nf4, double quantization, compute bfloat16"
        curve = [p["loss"] for p in meta["train_loss_curve"]]
        assert curve[-1] < curve[0] and meta["heldout_loss"] < meta["heldout_loss_base"]
    dirs = {n: result.run_dir / "adapters" / n for n in ("a", "b")}
    full = {dtype: adapters.load(str(tiny_model_dir), dirs, dtype=dtype) for dtype in DTYPES}
    quantized = adapters.load(str(tiny_model_dir), dirs, dtype="bfloat16",
                              quantization=load_recipe(recipe).model)
    for name in ("a", "b"):
        reference = logits(full["float32"].use(name).model)
        for loaded in (full["bfloat16"], quantized):
            assert (logits(loaded.use(name).model) - reference).abs().max() < 0.25 * reference.abs().max()
    with pytest.raises(LoraplexError, match="quantized as 4bit fp4"):  # other 4-bit codes than it trained on
        adapters.load(str(tiny_model_dir), dirs, dtype="bfloat16",
                      quantization=load_recipe(recipe, ["model.quant_type=fp4"]).model)


# --------------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("loss_kwargs", [True, False], ids=["model-takes-loss-kwargs", "model-without-loss-kwargs"])
def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(loss_kwargs, tiny_model_dir, tmp_path):
    """batch 4 × 1 and batch 2 × accumulation 2 are one step over the same 4 rows: the same gradient."""
    from peft import get_peft_model

    from loraplex.pipeline import open_recipe
    from loraplex.lm.settings import lora_config
    from loraplex.training.trainer import make_trainer

    grads = {}

    class KeepGradients(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads[self.key] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for batch, accumulation in ((4, 1), (2, 2)):
        train = {"batch_size": batch, "grad_accum": accumulation, "max_steps": 1, "max_grad_norm": 1e9}
        ws = open_recipe(recipe_for(tmp_path / f"{batch}", tiny_model_dir, "float32", train), only=["a"])
        spec = ws.recipe.dataset("a")
        model = load_model(ws.base)
        model.accepts_loss_kwargs = loss_kwargs  # as a model class that declares it
        torch.manual_seed(0)
        peft_model = get_peft_model(model, lora_config(spec))
        trainer, _ = make_trainer(peft_model, spec, ws.prepare()["a"], tmp_path / f"ckpt{batch}", progress=False)
        trainer.add_callback(KeepGradients(batch))
        trainer.train()
    whole, accumulated = grads[4], grads[2]
    assert whole.keys() == accumulated.keys() and any(g.abs().max() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- the adapter set


def test_use_none_runs_the_untouched_base(host_run, tiny_model_dir):
    trained_bf16, result, _ = host_run
    dtype = "bfloat16" if trained_bf16 else "float32"
    loaded = adapters.load(str(tiny_model_dir), {n: result.run_dir / "adapters" / n for n in ("a", "b")}, dtype=dtype)
    base = logits(load_model(resolve_base(str(tiny_model_dir)), getattr(torch, dtype)))
    assert torch.equal(logits(loaded.use(None).model), base)
    assert not torch.equal(logits(loaded.use("b").model), base)
    assert torch.equal(logits(loaded.use(None).model), base)
    assert loaded.active is None


# --------------------------------------------------------------------------- recipe and tokenizer


LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def test_llama3_template_needs_llama3_tokens(tiny_model_dir, tmp_path):
    from loraplex.pipeline import open_recipe

    raw = recipe_for(tmp_path, tiny_model_dir)
    raw["datasets"][0]["template"] = "llama3"
    with pytest.raises(RecipeError) as info:
        open_recipe(raw)
    (line,) = info.value.problems
    assert line.startswith("datasets[a]: template: llama3 marks turns with <|begin_of_text|>, <|start_header_id|>, "
                           "<|end_header_id|>, <|eot_id|>, which the tokenizer of")
    assert "remove template: to use the tokenizer's own chat template" in line
    # a tokenizer that holds them trains on <|eot_id|> as one token
    llama_dir = make_tiny_model_dir(tmp_path / "llama3-tokens", extra_special_tokens=LLAMA3_TOKENS)
    raw["model"]["path"] = str(llama_dir)
    ws = open_recipe(raw, only=["a"])
    row = ws.prepare()["a"].train[0]
    eot = ws.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert answer[-1] == eot and answer.count(eot) == 1
    words = ("apple", "river", "stone", "cloud", "amber", "pilot")
    assert ws.tokenizer.decode(answer[:-1]) in {f"{w} {w}" for w in words}


def test_tokenizer_without_template_or_chatml_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from loraplex.data.render import template_problems

    specs = load_recipe({"datasets": [{"name": "d", "path": str(Path(__file__))}]}).datasets
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bare = PreTrainedTokenizerFast(tokenizer_object=backend)  # no chat template, no special tokens
    (line,) = template_problems(specs, bare, "bare-model")
    assert line.startswith("datasets[d]: the tokenizer has no chat template, and the chatml fallback marks turns "
                           "with <|im_start|>, <|im_end|>, which the tokenizer of bare-model does not hold as tokens")
    bare.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert template_problems(specs, bare, "bare-model") == []


@pytest.mark.parametrize("path", ["default", "meta-llama/Meta-Llama-3-8B-Instruct"])
def test_model_as_a_string_is_its_path(path, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    raw = {"model": path, "datasets": [{"name": "a", "path": str(tmp_path / "a.jsonl")}]}
    recipe = load_recipe(raw)
    assert recipe.model.path == path and recipe.model.dtype == "auto"
    assert load_recipe(raw, ["model.dtype=bfloat16"]).model.dtype == "bfloat16"


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_adapters_after_a_plain_import(tiny_model_dir, tmp_path):
    done = _python(f"import loraplex; s = loraplex.adapters.load({str(tiny_model_dir)!r}, dtype='float32'); "
                   "print(type(s).__name__, s.names)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "AdapterSet []"


def test_library_warnings_stay_out_of_the_output():
    """peft imports bitsandbytes, which logs about an optional package on AVX512 CPUs: not shown to the user."""
    done = _python("import loraplex, peft, logging\n"
                   "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('PROBE from bitsandbytes')\n"
                   "logging.getLogger('loraplex.elsewhere').warning('PROBE from elsewhere')\n")
    assert done.returncode == 0, done.stderr
    assert "PROBE from bitsandbytes" not in done.stderr and "kernels-community" not in done.stderr
    assert "PROBE from elsewhere" in done.stderr  # only bitsandbytes is quieted
