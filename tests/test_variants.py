"""LoRA variants on a tiny random Llama (float32 and bfloat16, forced): every init trains; the base is bit-identical
afterwards; the saved adapter on the untouched base reproduces the trained model; merges are exact; LoRA+ gives B
its own learning rate; what PEFT cannot do is refused with the reason."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from loraplex import adapters, train
from loraplex.errors import LoraplexError, RecipeError
from loraplex.lora_settings import BASE_REWRITING, LoraSettings, variant_name
from loraplex.merging import merge
from loraplex.recipe import load_recipe
from loraplex.training import runner
from test_qlora import needs_bnb

ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "amber", "pilot"] * 4]
INITS = ["gaussian", "pissa", "olora", "eva", "corda"]
LR, RATIO = 3e-2, 16.0
PROBE = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 12]])


def variant_recipe(tmp: Path, model_dir: Path, dtype: str, loras: dict[str, dict], **model) -> dict:
    write_jsonl(tmp / "a.jsonl", ROWS)
    return {"model": {"path": str(model_dir), "dtype": dtype, **model}, "output_dir": str(tmp / "runs"),
            "run_name": "v", "defaults": {"train": {"max_steps": 3, "lr": LR, "batch_size": 8, "save_steps": 100},
                                          "lora": {"r": 4, "alpha": 8}},
            "datasets": [{"name": name, "path": str(tmp / "a.jsonl"), "target_modules": ["q_proj", "v_proj"],
                          "lora": lora} for name, lora in loras.items()]}


def train_watching_the_base(recipe: dict) -> tuple:
    """Train; returns the result, the in-memory base's tensors before training and the base after."""
    seen = {}
    load_base = runner.load_base

    def spy(ws, allow_pickle=False, **options):
        model, record = load_base(ws, allow_pickle, **options)
        seen["model"], seen["before"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model, record

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "load_base", spy)
        result = train(recipe, progress=False)
    return result, seen["before"], seen["model"]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def variants_run(request, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("variants")
    os.environ["LORAPLEX_HOME"] = str(tmp / "home")
    loras = {init: {"init": init} for init in INITS}
    loras["plus"] = {"loraplus_lr_ratio": RATIO, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 6}}
    recipe = variant_recipe(tmp, tiny_model_dir, request.param, loras)
    return (request.param, *train_watching_the_base(recipe))


def test_the_base_is_bit_identical_after_every_variant(variants_run):
    _, result, before, model = variants_run
    after = model.state_dict()
    assert set(after) == set(before)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    for name, meta in result.adapters.items():
        assert meta["variant"]["init"] == (name if name in INITS else "default")


def test_base_rewriting_inits_are_saved_as_plain_lora_of_rank_2r(variants_run):
    _, result, _, _ = variants_run
    for name in INITS:
        config = json.loads((result.run_dir / "adapters" / name / "adapter_config.json").read_text())
        rewriting = name in BASE_REWRITING
        assert config["r"] == (8 if rewriting else 4) and config["lora_alpha"] == (16 if rewriting else 8), name
        if rewriting:
            assert config["init_lora_weights"] is True
            assert "plain LoRA of rank 2r" in result.adapters[name]["variant"]["saved_as"]
            assert not (result.run_dir / "checkpoints" / name).exists()  # the initial A0, B0 went with them


def test_saved_adapter_on_the_untouched_base_reproduces_the_trained_model(variants_run, tiny_model_dir):
    """The logits of the trained model (a rewritten base for PiSSA/OLoRA/CorDA) against its saved adapter on the
    pristine base: equal up to the rounding of W_res in the training dtype, far below the adapter's own effect."""
    dtype, result, _, _ = variants_run
    loaded = adapters.load(str(tiny_model_dir), {n: result.run_dir / "adapters" / n for n in result.adapters},
                           dtype=dtype)
    with torch.no_grad():
        loaded.use(None)
        base_logits = loaded.model(input_ids=PROBE).logits.float()
        for name, meta in result.adapters.items():
            effect = (loaded.use(name).model(input_ids=PROBE).logits.float() - base_logits).abs().max()
            tolerance = 1e-4 if dtype == "float32" else 1.6e-2  # bf16: W_res rounded to 8 bits of mantissa
            assert meta["reload_max_abs_diff"] <= tolerance, (name, meta["reload_max_abs_diff"])
            assert effect > 10 * max(meta["reload_max_abs_diff"], tolerance / 10), (name, float(effect))


def test_every_variant_trains(variants_run):
    _, result, _, _ = variants_run
    for name, meta in result.adapters.items():
        tensors = load_file(result.run_dir / "adapters" / name / "adapter_model.safetensors")
        assert all(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k), name
        assert meta["heldout_loss"] < meta["heldout_loss_base"], name


@pytest.mark.parametrize("name", ["pissa", "plus"])
def test_merge_is_exact(variants_run, name, tmp_path):
    _, result, _, _ = variants_run
    report = merge(result.run_dir, [name], out_dir=tmp_path / "merged")
    assert report.verification["weights"]["max_relative"] < 1e-6
    logits = report.verification["logits"]
    assert logits["max_abs_diff"] < logits["tolerance"]


def test_rank_and_alpha_patterns_reach_the_adapter(variants_run):
    _, result, _, _ = variants_run
    tensors = load_file(result.run_dir / "adapters" / "plus" / "adapter_model.safetensors")
    ranks = {k.split(".")[-3]: t.shape[0] for k, t in tensors.items() if "lora_A" in k}
    assert ranks == {"q_proj": 4, "v_proj": 2}
    config = json.loads((result.run_dir / "adapters" / "plus" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 2} and config["alpha_pattern"] == {"v_proj": 6}


def test_loraplus_gives_b_its_learning_rate(tiny_model_dir, tmp_path):
    from peft import get_peft_model

    from loraplex.models import load_model, resolve_base
    from loraplex.pipeline import open_recipe
    from loraplex.lm.settings import lora_config
    from loraplex.training.trainer import make_trainer

    recipe = variant_recipe(tmp_path, tiny_model_dir, "float32", {"plus": {"loraplus_lr_ratio": RATIO},
                                                                   "plain": {}})
    ws = open_recipe(recipe)
    prepared = ws.prepare()
    for name, b_lr in (("plus", LR * RATIO), ("plain", LR)):
        spec = ws.recipe.dataset(name)
        model = get_peft_model(load_model(resolve_base(str(tiny_model_dir)), torch.float32), lora_config(spec))
        trainer, _ = make_trainer(model, spec, prepared[name], tmp_path / "ck", progress=False)
        optimizer = trainer.create_optimizer()
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        named = dict(model.named_parameters())
        assert optimizer is trainer.optimizer
        assert [lr_of[id(p)] for n, p in named.items() if "lora_B" in n] == pytest.approx([b_lr] * 4)
        assert [lr_of[id(p)] for n, p in named.items() if "lora_A" in n] == pytest.approx([LR] * 4)


def test_eva_reads_the_datasets_own_training_rows(tiny_model_dir, tmp_path):
    from loraplex.models import load_model, resolve_base
    from loraplex.pipeline import open_recipe
    from loraplex.lm.settings import lora_config
    from loraplex.training.variants import Variant

    recipe = variant_recipe(tmp_path, tiny_model_dir, "float32", {"eva": {"init": "eva"}})
    ws = open_recipe(recipe)
    data = ws.prepare()["eva"]
    spec = ws.recipe.dataset("eva")
    other_rows = [{**row, "input_ids": list(reversed(row["input_ids"]))} for row in data.train]

    def eva_a(rows) -> torch.Tensor:
        model = load_model(resolve_base(str(tiny_model_dir)), torch.float32)
        peft_model = Variant(spec, rows, tmp_path / "ck").inject(model, lora_config(spec))
        return peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()

    first, again, other = eva_a(data.train), eva_a(data.train), eva_a(other_rows)
    torch.testing.assert_close(first.abs(), again.abs())  # the SVD of the same inputs (up to sign)
    assert (first.abs() - other.abs()).abs().max() > 1e-3  # other rows, another A


def test_eva_keeps_every_lora_weight_in_float32_on_a_bfloat16_base(tiny_model_dir, tmp_path):
    """PEFT loads a saved adapter's weights in float32 onto a bfloat16 base; EVA's init must leave the trained ones
    in float32 too, or the adapter trains in bfloat16 and its saved copy does not reproduce it."""
    from loraplex.lm.settings import lora_config
    from loraplex.models import load_model, resolve_base
    from loraplex.pipeline import open_recipe
    from loraplex.training.variants import Variant

    # rank 16 of the tiny model's 64 features: EVA moves rank between layers (rho 2), re-creating those layers
    recipe = variant_recipe(tmp_path, tiny_model_dir, "bfloat16", {"eva": {"init": "eva", "r": 16, "alpha": 32}})
    ws = open_recipe(recipe)
    spec = ws.recipe.dataset("eva")
    model = load_model(resolve_base(str(tiny_model_dir)), torch.bfloat16)
    peft_model = Variant(spec, ws.prepare()["eva"].train, tmp_path / "ck").inject(model, lora_config(spec))
    dtypes = {n: p.dtype for n, p in peft_model.named_parameters() if "lora_" in n}
    assert dtypes and set(dtypes.values()) == {torch.float32}, dtypes


def test_report_display_and_inspect_name_each_variant(variants_run):
    from rich.console import Console

    from loraplex.display import render_inspect, train_table
    from loraplex.inspect_adapter import inspect_adapter
    from loraplex.reporting.blocks import RunData
    from loraplex.reporting.sections import recipe_section
    from loraplex.run import read_recipe

    _, result, _, _ = variants_run
    console = Console(width=200, record=True)
    console.print(train_table(result.adapters))
    shown = console.export_text()
    names = ["LoRA (Gaussian A)", "PiSSA", "OLoRA", "EVA", "CorDA", "LoRA+ (B lr ×16) + per-module r/alpha"]
    assert all(name in shown for name in names), shown
    recipe = recipe_section(RunData(result.run_dir, read_recipe(result.run_dir), result.adapters, {}))
    assert [row[5] for row in recipe.blocks[0].rows] == names
    console.print(*render_inspect(inspect_adapter(result.run_dir / "adapters" / "pissa").to_dict()))
    assert "variant: PiSSA" in console.export_text()


# --------------------------------------------------------------------------- 4-bit base


@needs_bnb
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_variants_on_a_4bit_base(dtype, tiny_model_dir, tmp_path):
    from loraplex.models import base_fingerprint, load_model, resolve_base

    os.environ["LORAPLEX_HOME"] = str(tmp_path / "home")
    loras = {"gaussian": {"init": "gaussian"}, "eva": {"init": "eva"}, "loftq": {"init": "loftq"},
             "plus": {"loraplus_lr_ratio": RATIO}}
    result, before, model = train_watching_the_base(variant_recipe(tmp_path, tiny_model_dir, dtype, loras,
                                                                   quantization="4bit"))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if isinstance(v, torch.Tensor))
    torch_dtype = getattr(torch, dtype)
    fresh = base_fingerprint(load_model(resolve_base(str(tiny_model_dir)), torch_dtype), torch_dtype)
    for name, meta in result.adapters.items():
        assert meta["base_fingerprint"] == fresh and meta["quantized_base_fingerprint"]
        assert meta["reload_max_abs_diff"] <= (1e-4 if dtype == "float32" else 1.6e-2), name
        assert meta["heldout_loss"] < meta["heldout_loss_base"], name
    from loraplex.vllm_export import vllm_command

    with pytest.raises(LoraplexError, match="initialized with LoftQ.*count that error twice"):
        merge(result.run_dir, ["loftq"], out_dir=tmp_path / "merged")
    with pytest.raises(LoraplexError, match="initialized with LoftQ"):
        vllm_command(result.run_dir)
    merge(result.run_dir, ["eva"], out_dir=tmp_path / "merged-eva")  # the others merge on the full-precision base


@needs_bnb
def test_loftq_starts_closer_to_the_full_precision_weights(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    from loraplex.models import load_model
    from loraplex.pipeline import open_recipe
    from loraplex.quantize import quantization_config
    from loraplex.lm.settings import lora_config
    from loraplex.training.variants import Variant

    ws = open_recipe(variant_recipe(tmp_path, tiny_model_dir, "float32", {"q": {"init": "loftq"}},
                                    quantization="4bit"))
    spec = ws.recipe.dataset("q")
    full = load_model(ws.base, torch.float32).model.layers[0].self_attn.q_proj.weight.detach()
    model = load_model(ws.base, torch.float32, quantization_config=quantization_config(ws.recipe.model, ws.dtype))
    peft_model = Variant(spec, [], tmp_path / "ck", ws.base).inject(model, lora_config(spec))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.get_base_layer().weight
    quantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    low_rank = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.linalg.norm(full - quantized - low_rank) < 0.9 * torch.linalg.norm(full - quantized)


# --------------------------------------------------------------------------- recipe


def test_refusals_name_the_field_and_the_reason(tmp_path, tiny_model_dir):
    def problems(loras: dict, **model) -> str:
        with pytest.raises(RecipeError) as exc:
            load_recipe(variant_recipe(tmp_path, tiny_model_dir, "float32", loras, **model))
        return exc.value.render()

    assert "datasets[a].lora.init: loftq initializes LoRA against a 4-bit base" in problems({"a": {"init": "loftq"}})
    assert "datasets[a].lora.init: pissa rewrites the base weights" in problems({"a": {"init": "pissa"}},
                                                                               quantization="4bit")
    assert "DoRA's magnitude belongs to the rewritten base weight" in problems({"a": {"init": "olora",
                                                                                      "use_dora": True}})
    assert "loraplus_lr_ratio" in problems({"a": {"loraplus_lr_ratio": 0.5}})
    assert "rank_pattern['q_proj']: rank 0" in problems({"a": {"rank_pattern": {"q_proj": 0}}})
    raw = variant_recipe(tmp_path, tiny_model_dir, "float32", {"a": {"rank_pattern": {"q_proj": 2}}})
    raw["datasets"][0]["target_modules"] = "auto"
    with pytest.raises(RecipeError, match="rank_pattern/alpha_pattern with target_modules: auto"):
        load_recipe(raw)


def test_an_adapter_without_a_variant_keeps_its_fingerprint():
    """Variant fields left at their defaults are not in the fingerprint: adapters trained before they existed are
    kept; setting one retrains, and says which."""
    from loraplex.training.plan import what_changed

    plain = LoraSettings().fingerprint_dict()
    assert plain == {k: v for k, v in LoraSettings().model_dump(mode="json").items()
                     if k not in ("init", "loraplus_lr_ratio", "rank_pattern", "alpha_pattern")}
    pissa = LoraSettings(init="pissa").fingerprint_dict()
    assert what_changed({"lora": plain}, {"lora": pissa}) == "lora.init unset -> pissa"
    assert variant_name({"init": "pissa", "loraplus_lr_ratio": 16}) == "PiSSA + LoRA+ (B lr ×16)"
    assert variant_name({"use_dora": True}) == "DoRA"
