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
from loraplex.llamacpp.lora import gguf_target, lora_tensors, permute_rows, write_lora_gguf
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
    return {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in gguf.GGUFReader(path).tensors}


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
