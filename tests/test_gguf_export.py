"""`loraplex export gguf`: adapters as llama.cpp LoRA files read back with gguf's reader (tensor names, shapes,
alpha, the q/k row order of the GGUF base), the refusals, the Ollama Modelfile, the merged GGUF, and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gguf_base import converted_base, write_tiny_gguf
from loraplex.errors import LoraplexError
from loraplex.inspect_adapter import read_adapter
from loraplex.llamacpp.export import export_gguf
from loraplex.llamacpp.lora import GgufTarget, gguf_target, lora_problems, lora_tensors, permute_rows, write_lora_gguf
from loraplex.llamacpp.modelfile import GO_TEMPLATES
from loraplex.models import load_model, resolve_base


def make_adapter(run_dir: Path, name: str, base_dir: Path, target_modules: list[str], r: int = 4, seed: int = 0,
                 **lora) -> Path:
    """A PEFT adapter with B != 0 (a LoRA B starts at zero: an export test with B = 0 proves nothing), saved as
    loraplex saves one."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = resolve_base(str(base_dir))
    model = get_peft_model(load_model(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules,
                                                        lora_dropout=0.0, **lora))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.2)
    folder = run_dir / "adapters" / name
    model.save_pretrained(folder)
    info = {"name": name, "base_model": base.name, "base_model_location": base.location, "dtype": "float32"}
    (folder / "loraplex.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def gguf_base(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny base as a GGUF file, a model folder converted from it)."""
    root = tmp_path_factory.mktemp("gguf-base")
    path = write_tiny_gguf(tiny_model_dir, root / "tiny.gguf")
    return path, converted_base(tiny_model_dir, path, root / "tiny-converted")


@pytest.fixture(scope="module")
def qkv_adapter(gguf_base, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gguf-run")
    return make_adapter(run, "zh", gguf_base[1], ["q_proj", "k_proj", "v_proj", "down_proj"], r=4)


def gguf_weights(path: Path) -> dict[str, np.ndarray]:
    tensors = gguf.GGUFReader(path).tensors
    return {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in tensors}


def test_names_shapes_and_alpha_read_back(qkv_adapter, gguf_base, tmp_path):
    adapter = read_adapter(qkv_adapter)
    path = write_lora_gguf(adapter, gguf_target(str(gguf_base[1])), tmp_path / "zh.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)  # lora_alpha = 2r, r = 4
    shapes = {t.name: [int(d) for d in reversed(t.shape)] for t in reader.tensors}
    # 2 layers x 4 modules; A [r, in], B [out, r] with out = 64 (q), 32 (k, v: 2 of 4 heads), 64 (down)
    assert len(shapes) == 16
    assert shapes["blk.0.attn_q.weight.lora_a"] == [4, 64] and shapes["blk.0.attn_q.weight.lora_b"] == [64, 4]
    assert shapes["blk.1.attn_k.weight.lora_b"] == [32, 4] and shapes["blk.1.attn_v.weight.lora_b"] == [32, 4]
    assert shapes["blk.1.ffn_down.weight.lora_a"] == [4, 128] and shapes["blk.1.ffn_down.weight.lora_b"] == [64, 4]


def test_the_delta_lands_on_the_gguf_base_rows(qkv_adapter, gguf_base, tmp_path):
    """W_gguf + (alpha/r)·B_gguf@A_gguf equals the GGUF layout of W + ΔW, q/k permutation included."""
    adapter = read_adapter(qkv_adapter)
    lora = gguf_weights(write_lora_gguf(adapter, gguf_target(str(gguf_base[1])), tmp_path / "zh.gguf"))
    base = gguf_weights(gguf_base[0])
    weights = load_file(gguf_base[1] / "model.safetensors")
    for module, tensor, heads in [("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight", 4),
                                  ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight", 2),
                                  ("model.layers.1.self_attn.v_proj", "blk.1.attn_v.weight", None),
                                  ("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight", None)]:
        merged = (weights[f"{module}.weight"].float() + adapter.modules[module].delta()).numpy()
        expected = permute_rows(merged, heads) if heads else merged
        a, b = lora[f"{tensor}.lora_a"], lora[f"{tensor}.lora_b"]
        got = base[tensor] + (8.0 / a.shape[0]) * b @ a
        assert np.abs(adapter.modules[module].delta().numpy()).max() > 1e-2  # B != 0: a real delta
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rslora_scaling_is_carried_in_b(gguf_base, tmp_path):
    """llama.cpp scales by alpha/r; an rsLoRA adapter (alpha/√r) still gives PEFT's delta."""
    folder = make_adapter(tmp_path / "run", "ja", gguf_base[1], ["v_proj"], r=4, use_rslora=True)
    adapter = read_adapter(folder)
    lora = lora_tensors(adapter, gguf_target(str(gguf_base[1])))
    a, b = lora["blk.0.attn_v.weight.lora_a"], lora["blk.0.attn_v.weight.lora_b"]
    np.testing.assert_allclose((8.0 / 4) * b @ a, adapter.modules["model.layers.0.self_attn.v_proj"].delta().numpy(),
                               atol=1e-6)


# --------------------------------------------------------------------------- refusals


def test_dora_and_extra_tensors_are_refused_and_nothing_is_written(gguf_base, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.resolved.yaml").write_text("model:\n  path: tiny\ndatasets: {}\n", encoding="utf-8")
    make_adapter(run, "dora", gguf_base[1], ["q_proj"], use_dora=True)
    folder = make_adapter(run, "bias", gguf_base[1], ["v_proj"])
    weights = load_file(folder / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.self_attn.v_proj.bias"] = torch.ones(32)
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(LoraplexError) as caught:
        export_gguf(run)
    text = caught.value.render()
    assert "2 problem(s) stop the GGUF export" in text
    assert "dora: trained with DoRA (use_dora); llama.cpp applies only A and B" in text
    assert "datasets.dora.lora.use_dora=false" in text
    assert "bias: holds tensors other than LoRA A/B of linear layers" in text and "v_proj.bias" in text
    assert not (run / "gguf").exists()


def test_another_architecture_and_a_foreign_base_are_refused(qkv_adapter, gguf_base, tmp_path):
    adapter = read_adapter(qkv_adapter)
    qwen = GgufTarget("qwen2", 2, 4, 2, {}, None)
    assert "architecture 'qwen2'" in lora_problems("zh", adapter, qwen)[0]
    target = gguf_target(str(gguf_base[1]))
    smaller = GgufTarget(target.arch, 2, 4, 2, {**target.tensors, "blk.0.attn_q.weight": (48, 64)}, target.gguf_path)
    problems = lora_problems("zh", adapter, smaller)
    assert problems == ["zh: module model.layers.0.self_attn.q_proj is [64, 64] but the base GGUF's "
                        "blk.0.attn_q.weight is [48, 64]: the adapter was trained on another base"]


# --------------------------------------------------------------------------- a trained run on a GGUF base

WORDS = ["河流", "山峰", "星星", "月亮", "花朵", "森林", "大海", "雨水", "风筝", "书本", "灯笼", "桥梁"]
SYSTEM = "只重复用户给的词两次。"


@pytest.fixture(scope="module")
def trained(gguf_base, tmp_path_factory):
    """(run folder, merged folder, LORAPLEX_HOME): an adapter trained on the GGUF base's conversion, and its merge."""
    from conftest import write_jsonl
    from loraplex import merge, train

    tmp = tmp_path_factory.mktemp("gguf-trained")
    rows = [{"instruction": f"请重复这个词：{w}。", "input": "", "output": f"{w}{w}"} for w in WORDS]
    write_jsonl(tmp / "train.jsonl", rows[:9] * 4)
    write_jsonl(tmp / "test.jsonl", rows[9:])
    recipe = {"model": {"path": str(gguf_base[1]), "dtype": "float32"}, "output_dir": str(tmp / "runs"),
              "run_name": "g", "defaults": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "val_size": 0.1,
                                            "train": {"max_steps": 30, "lr": 3e-2, "batch_size": 8,
                                                      "save_steps": 100, "logging_steps": 10}},
              "datasets": [{"name": "zh", "path": str(tmp / "train.jsonl"), "test_path": str(tmp / "test.jsonl"),
                            "system": SYSTEM, "target_modules": ["q_proj", "k_proj", "v_proj"]}]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(tmp / "home"))
        result = train(recipe, progress=False)
        merge(result.run_dir, ["zh"], out_dir=tmp / "merged-zh")
    return result.run_dir, tmp / "merged-zh", tmp / "home"


def expand_go_template(template: str, messages: list[dict]) -> str:
    """The two Go template constructs the Modelfile uses: {{- range .Messages }} ... {{ end }}, .Role, .Content."""
    head, rest = template.split("{{- range .Messages }}")
    body, tail = rest.split("{{ end }}")
    turns = "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages)
    return head.rstrip() + turns + tail


def test_the_modelfile_says_what_the_adapter_trained_with(trained, gguf_base, tiny_tokenizer, monkeypatch):
    run_dir, _, home = trained
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    result = export_gguf(run_dir, out=run_dir / "gguf-modelfile")
    text = result.modelfiles["zh"].read_text(encoding="utf-8")
    lines = text.splitlines()
    assert f"FROM {gguf_base[0]}" in lines and "ADAPTER ./lora.gguf" in lines
    assert f'SYSTEM """{SYSTEM}"""' in lines and 'PARAMETER stop "<|im_end|>"' in lines
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    assert template == GO_TEMPLATES["chatml"]
    # Ollama's rendering of a request (SYSTEM first) is the text the adapter was trained to answer
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "请重复这个词：河流。"}]
    assert expand_go_template(template, messages) == tiny_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert (result.loras["zh"].parent / "Modelfile") == result.modelfiles["zh"]


@pytest.mark.parametrize("out_type, atol", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_the_merged_model_is_the_base_gguf_with_merged_weights(trained, gguf_base, out_type, atol, tmp_path):
    from loraplex.llamacpp.merged import write_merged_gguf

    _, merged_dir, _ = trained
    path = write_merged_gguf(merged_dir, gguf_base[0], tmp_path / f"m.{out_type}.gguf", out_type)
    reader, base = gguf.GGUFReader(path), gguf.GGUFReader(gguf_base[0])
    assert [t.name for t in reader.tensors] == [t.name for t in base.tensors]
    for key in ("tokenizer.ggml.tokens", "llama.attention.head_count_kv", "tokenizer.ggml.eos_token_id"):
        assert reader.fields[key].contents() == base.fields[key].contents()
    merged = load_file(merged_dir / "model.safetensors")
    original = load_file(gguf_base[1] / "model.safetensors")
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.1.attn_q.weight"]
    got = gguf.quants.dequantize(q.data, q.tensor_type)
    weight = merged["model.layers.1.self_attn.q_proj.weight"].float()
    assert (weight - original["model.layers.1.self_attn.q_proj.weight"]).abs().max() > 1e-3  # the merge changed it
    np.testing.assert_allclose(got, permute_rows(weight.numpy(), 4), atol=atol)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_the_cli_writes_and_refuses_to_overwrite(trained, monkeypatch):
    from typer.testing import CliRunner

    from loraplex.cli import app

    run_dir, merged_dir, home = trained
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    out = run_dir.parent / "cli-out"
    args = ["export", "gguf", str(run_dir), "--out", str(out), "--merged", str(merged_dir), "--merged-type", "q8_0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "zh" / "lora.gguf").is_file() and (out / "merged-zh.q8_0.gguf").is_file()
    assert f"--lora {out / 'zh' / 'lora.gguf'}" in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--out: " in again.output
    assert "choose another folder, or pass --force" in again.output
    assert CliRunner().invoke(app, args + ["--force"]).exit_code == 0


# --------------------------------------------------------------------------- the llama.cpp round trip


def llama_cpp_or_skip():
    """llama-cpp-python, or a skip saying what is missing (a failure under `make test`, whose setup builds it)."""
    import importlib.util
    import os

    if importlib.util.find_spec("llama_cpp") is None:
        reason = ("needs llama-cpp-python (built from its sdist with cmake and a C++ compiler); "
                  "`make setup` installs it)")
        if os.environ.get("LORAPLEX_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.llamacpp
def test_llama_cpp_runs_the_exported_adapter_as_loraplex_does(trained, monkeypatch):
    """The GGUF base (float32) + the LoRA file in llama.cpp against loraplex's base + adapter: the same greedy
    tokens, log-probs equal to float32 rounding, and the adapter's held-out loss gain under both."""
    llama_cpp_or_skip()
    run_dir, _, home = trained
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    result = export_gguf(run_dir, out=run_dir / "gguf-verify", verify=True, rows=3)
    check = result.checks["zh"]
    assert check.rows == 3 and check.answer_tokens > 3 * 4
    assert check.greedy_agreement == 1.0, check.samples
    assert check.base_gap < 1e-3 and check.adapter_gap < 1e-3, (check.base_gap, check.adapter_gap)
    ours, theirs = check.loss["loraplex"], check.loss["llama.cpp"]
    assert ours["base"] - ours["adapter"] > 0.05  # the adapter learned something that carries to unseen words
    assert theirs["base"] - theirs["adapter"] == pytest.approx(ours["base"] - ours["adapter"], abs=1e-3)
    written = json.loads((result.out_dir / "zh" / "llama_cpp_check.json").read_text(encoding="utf-8"))
    assert written["greedy_agreement"] == 1.0 and written["adapter"] == "zh"
