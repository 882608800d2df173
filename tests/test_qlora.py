"""QLoRA on a tiny random Llama: 4-bit NF4 base through bitsandbytes (CPU here), per-dataset adapters that are
ordinary LoRA weights, isolation of the quantized base, loading onto the full-precision base, merging there."""
from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model_dir, write_jsonl
from loraplex import adapters, quantize
from loraplex.errors import ModelError
from loraplex.models import base_fingerprint, base_state_items, load_model, resolve_base
from loraplex.recipe import TrainSettings, load_recipe

ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "amber", "pilot"] * 8]


def _bitsandbytes_problem() -> str | None:
    try:
        quantize.require_bitsandbytes("4bit")
    except ModelError as exc:
        return exc.render()
    return None


BNB_PROBLEM = _bitsandbytes_problem()
needs_bnb = pytest.mark.skipif(BNB_PROBLEM is not None, reason=f"bitsandbytes cannot run 4-bit here: {BNB_PROBLEM}")


def qlora_recipe(tmp_path: Path, model_dir: Path, train: dict | None = None, **model) -> dict:
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    write_jsonl(tmp_path / "b.jsonl", list(reversed(ROWS)))
    train = {"epochs": 4, "lr": 3e-2, "batch_size": 8, "save_steps": 100, "logging_steps": 1, **(train or {})}
    return {
        "model": {"path": str(model_dir), "dtype": "float32", "quantization": "4bit", **model},
        "output_dir": str(tmp_path / "runs"), "run_name": "q",
        "defaults": {"train": train, "lora": {"r": 4, "alpha": 8}},
        "datasets": [{"name": "a", "path": str(tmp_path / "a.jsonl"), "target_modules": ["q_proj"]},
                     {"name": "b", "path": str(tmp_path / "b.jsonl"), "target_modules": ["v_proj", "down_proj"]}],
    }


def quantized_config(model_dir: Path, **model):
    return quantize.quantization_config(load_recipe(qlora_recipe_stub(model_dir, **model)).model, torch.float32)


def qlora_recipe_stub(model_dir: Path, **model) -> dict:
    return {"model": {"path": str(model_dir), "dtype": "float32", "quantization": "4bit", **model},
            "datasets": [{"name": "a", "path": str(Path(__file__))}]}  # any existing file: only model: is used


@pytest.fixture(scope="module", params=[False, True], ids=["cpu-repack-hardware-off", "cpu-repack-hardware-on"])
def qlora_run(request, tiny_model_dir, tmp_path_factory):
    """Trained as if the CPU had AVX512-BF16 (bitsandbytes' repack to its inference layout armed on every 4-bit
    layer) and as if it had not, whatever this CPU has; the tests that use the run see the same machine."""
    from loraplex import train

    tmp = tmp_path_factory.mktemp("qlora")
    os.environ["LORAPLEX_HOME"] = str(tmp / "home")
    if BNB_PROBLEM is not None:
        pytest.skip(f"bitsandbytes cannot run 4-bit here: {BNB_PROBLEM}")
    import bitsandbytes.nn.modules

    # one attention path for forward and recomputation; the default path with checkpointing has its own test
    masked = {"packed_attention": "masked"} if "packed_attention" in TrainSettings.model_fields else {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: request.param)
        yield train(qlora_recipe(tmp, tiny_model_dir, masked), progress=False)


# --------------------------------------------------------------------------- recipe and platform errors


def test_recipe_quantization_fields(tmp_path):
    model = load_recipe(qlora_recipe_stub(tmp_path)).model
    assert (model.quantization, model.quant_type, model.double_quant, model.gradient_checkpointing) == \
        ("4bit", "nf4", True, None)
    assert quantize.gradient_checkpointing(model)  # on by default with quantization
    off = load_recipe(qlora_recipe_stub(tmp_path), ["model.quantization=none"]).model
    assert off.quantization is None and not quantize.gradient_checkpointing(off)
    assert load_recipe(qlora_recipe_stub(tmp_path, quant_type="fp4")).model.quant_type == "fp4"


@pytest.mark.skipif(BNB_PROBLEM is not None, reason=f"needs bitsandbytes that runs 4-bit here: {BNB_PROBLEM}")
def test_fsdp_stores_the_four_bit_codes_in_the_compute_dtype(tmp_path):
    """FSDP shards a flat tensor of one dtype: the packed codes must share the compute dtype, only under FSDP."""
    spec = load_recipe(qlora_recipe_stub(tmp_path)).model
    sharded = quantize.quantization_config(spec, torch.bfloat16, "fsdp")
    assert (sharded.bnb_4bit_compute_dtype, sharded.bnb_4bit_quant_storage) == (torch.bfloat16, torch.bfloat16)
    assert quantize.quantization_config(spec, torch.bfloat16, "ddp").bnb_4bit_quant_storage == torch.uint8


def test_missing_bitsandbytes_names_the_pip_command(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ModelError) as info:
        quantize.quantization_config(load_recipe(qlora_recipe_stub(tmp_path)).model, torch.float32)
    message = info.value.render()
    assert "needs the package bitsandbytes" in message and "pip install 'bitsandbytes>=0.45'" in message


@needs_bnb
def test_bitsandbytes_that_cannot_run_says_what_failed(monkeypatch):
    import bitsandbytes as bnb

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.nn, "Linear4bit", broken)
    quantize._smoke_test.cache_clear()
    try:
        with pytest.raises(ModelError) as info:
            quantize.require_bitsandbytes("4bit")
    finally:
        monkeypatch.undo()
        quantize._smoke_test.cache_clear()
    message = info.value.render()
    assert f"bitsandbytes {bnb.__version__} cannot run on this machine" in message
    assert "RuntimeError: no kernel for this device" in message and "CPU or CUDA support" in message


# --------------------------------------------------------------------------- the quantized base


@needs_bnb
def test_fingerprint_covers_packed_weights_and_quant_state(tiny_model_dir):
    model = load_model(resolve_base(str(tiny_model_dir)), quantization_config=quantized_config(tiny_model_dir))
    items = dict(base_state_items(model))
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert items[q_proj].dtype == torch.uint8 and items[q_proj].numel() == 64 * 64 // 2  # two 4-bit codes a byte
    assert {f"{q_proj}.absmax", f"{q_proj}.quant_map", f"{q_proj}.nested_absmax"} <= set(items)
    before = base_fingerprint(model)
    again = load_model(resolve_base(str(tiny_model_dir)), quantization_config=quantized_config(tiny_model_dir))
    assert base_fingerprint(again) == before  # NF4 quantization is deterministic
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.weight.data[0, 0] ^= 1  # one packed code
    assert base_fingerprint(model) != before
    with torch.no_grad():
        layer.weight.data[0, 0] ^= 1
        layer.weight.quant_state.state2.absmax[0] += 1  # the double-quantization state
    assert base_fingerprint(model) != before
    full = load_model(resolve_base(str(tiny_model_dir)))
    assert base_fingerprint(full) != before


# --------------------------------------------------------------------------- training


def test_gradient_checkpointing_trains_with_the_default_attention(tiny_model_dir, tmp_path):
    """Checkpointing recomputes each layer in the backward pass: with the same attention as its forward."""
    from loraplex import train

    recipe = qlora_recipe(tmp_path, tiny_model_dir, {"max_steps": 2}, quantization=None, gradient_checkpointing=True)
    result = train(recipe, only=["b"], progress=False)
    assert result.adapters["b"]["gradient_checkpointing"] is True and result.adapters["b"]["steps"] == 2


def test_qlora_adapters_train_and_hold_only_lora_weights(qlora_run):
    for name, modules in (("a", {"q_proj"}), ("b", {"v_proj", "down_proj"})):
        meta = qlora_run.adapters[name]
        curve = [p["loss"] for p in meta["train_loss_curve"]]
        assert curve[-1] < curve[0], curve
        assert meta["heldout_loss"] < meta["heldout_loss_base"]
        assert meta["quantization"] == "4bit nf4, double quantization, compute float32"
        assert meta["gradient_checkpointing"] is True and meta["reload_max_abs_diff"] == 0.0
        tensors = load_file(qlora_run.run_dir / "adapters" / name / "adapter_model.safetensors")
        assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
        assert {k.split(".")[-3] for k in tensors} == modules
        assert all(t.dtype == torch.float32 for t in tensors.values())  # full precision, unlike the base
    config = json.loads((qlora_run.run_dir / "adapters" / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    # parameters counted unpacked: the same total as the full-precision model plus the adapter
    full_total = sum(p.numel() for p in load_model(resolve_base(qlora_run.adapters["a"]["base_model_location"]))
                     .parameters())
    assert qlora_run.adapters["a"]["total_params"] == full_total + qlora_run.adapters["a"]["trainable_params"]


def test_quantized_base_is_unchanged_and_both_fingerprints_recorded(qlora_run, tiny_model_dir):
    ref = resolve_base(str(tiny_model_dir))
    quantized = base_fingerprint(load_model(ref, quantization_config=quantized_config(tiny_model_dir)))
    full = base_fingerprint(load_model(ref))
    for meta in qlora_run.adapters.values():
        # train() compared the quantized base before and after each adapter; a fresh 4-bit load agrees
        assert meta["quantized_base_fingerprint"] == quantized
        assert meta["base_fingerprint"] == full != quantized


@torch.no_grad()
def test_adapter_loads_onto_the_full_precision_base(qlora_run, tiny_model_dir):
    from peft import PeftModel

    adapter_dir = qlora_run.run_dir / "adapters" / "b"
    loaded = adapters.load(str(tiny_model_dir), {"b": adapter_dir}, dtype="float32")  # fingerprint checked
    assert loaded.base_precision == "full" and not quantize.is_quantized(loaded.model.get_base_model())
    ref = resolve_base(str(tiny_model_dir))
    quantized = PeftModel.from_pretrained(load_model(ref, quantization_config=quantized_config(tiny_model_dir)),
                                          adapter_dir).eval()
    ids = torch.tensor([list(range(3, 40))])
    full_logits = loaded.model(input_ids=ids).logits
    base_logits = loaded.use(None).model(input_ids=ids).logits
    quantized_logits = quantized(input_ids=ids).logits
    adapter_effect = float((full_logits - base_logits).abs().max())
    quantization_error = float((full_logits - quantized_logits).abs().max())
    # loose (NF4 rounds every base weight): here about 0.05, with logits up to about 0.5 and an adapter that
    # moves them by about 1; without the adapter the full base is as far from the 4-bit model + adapter
    assert quantization_error < 0.2 * float(full_logits.abs().max()), quantization_error
    assert quantization_error < 0.25 * adapter_effect, (quantization_error, adapter_effect)
    assert quantization_error < 0.25 * float((base_logits - quantized_logits).abs().max())


def test_adapter_loads_onto_the_quantized_base_and_refuses_another(qlora_run, tiny_model_dir, tmp_path):
    adapter_dir = qlora_run.run_dir / "adapters" / "a"
    model_spec = load_recipe(qlora_recipe_stub(tiny_model_dir)).model
    loaded = adapters.load(str(tiny_model_dir), {"a": adapter_dir}, dtype="float32", quantization=model_spec)
    assert loaded.base_precision.startswith("4bit nf4") and quantize.is_quantized(loaded.model.get_base_model())
    # other 4-bit codes
    with pytest.raises(ModelError, match="quantized as 4bit nf4.*load it with the base it was trained on"):
        adapters.load(str(tiny_model_dir), {"a": adapter_dir}, dtype="float32",
                      quantization=load_recipe(qlora_recipe_stub(tiny_model_dir, quant_type="fp4")).model)
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(ModelError, match="was trained on .* load it with the base it was trained on"):
        adapters.load(str(other), {"a": adapter_dir}, dtype="float32")


def test_merge_of_a_qlora_adapter_uses_the_full_precision_base(qlora_run, tmp_path):
    from loraplex.merging import merge

    lines: list[str] = []
    report = merge(qlora_run.run_dir, ["a", "b"], out_dir=tmp_path / "merged", echo=lines.append)
    assert report.base_precision == "full"
    assert set(report.trained_on_quantized_base) == {"a", "b"}
    note = report.precision_note  # printed by `loraplex merge` (echo) before it merges
    assert "trained on a quantized base (4bit nf4" in note and "merged onto the full-precision base weights" in note
    assert note in lines
    assert report.verification["weights"]["max_relative"] < 1e-4  # W' = W + ΔW on the float32 weights
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())  # no packed 4-bit weights in the merged model


def test_eval_records_the_base_precision(qlora_run):
    from loraplex.evaluation import evaluate_run

    full = evaluate_run(qlora_run.run_dir, generation={"enabled": False})
    assert (full.base_precision, full.base_loaded_as) == ("full", "full")
    assert full.trained_on == "4bit nf4, double quantization, compute float32"
    a_full = full.metrics["a"]["a"]["loss"]
    assert a_full == pytest.approx(qlora_run.adapters["a"]["heldout_loss"], abs=0.05)  # close, not equal
    quantized = evaluate_run(qlora_run.run_dir, generation={"enabled": False}, base_precision="quantized")
    assert quantized.base_precision == "quantized" and quantized.base_loaded_as.startswith("4bit nf4")
    # on the base it trained on, the diagonal is the held-out loss recorded at training time
    assert quantized.metrics["a"]["a"]["loss"] == pytest.approx(qlora_run.adapters["a"]["heldout_loss"], rel=1e-5)


# --------------------------------------------------------------------------- bitsandbytes' CPU repack


def _eval_forward(model) -> None:
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([list(range(3, 30))]))


@needs_bnb
@pytest.mark.parametrize("hardware", [False, True], ids=["avx512bf16-off", "avx512bf16-on"])
def test_four_bit_layers_keep_their_training_layout_through_evaluation(hardware, tiny_model_dir, monkeypatch):
    """Held-out loss and generation run the layers in eval mode without gradients, where bitsandbytes would
    repack them on an AVX512-BF16 CPU; loraplex's loads keep them as training sees them, on every CPU."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: hardware)
    model = load_model(resolve_base(str(tiny_model_dir)), quantization_config=quantized_config(tiny_model_dir))
    layers = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    before = base_fingerprint(model)
    _eval_forward(model)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert base_fingerprint(model) == before


@needs_bnb
@pytest.mark.skipif(not quantize.cpu_repack_hardware(), reason="needs a CPU with AVX512-BF16: bitsandbytes repacks "
                    "4-bit layers into its inference layout only there")
def test_left_armed_the_cpu_repack_changes_the_base(tiny_model_dir):
    """Why loraplex disarms it: on this CPU the repack rounds absmax to bfloat16, so the weights move."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=quantized_config(tiny_model_dir))
    before = base_fingerprint(model)
    _eval_forward(model)
    assert base_fingerprint(model) != before
