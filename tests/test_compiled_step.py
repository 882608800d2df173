"""`train.compile`: the traceable per-sequence attention, where compiling applies, the eager fallback, and the
compiled training step's losses against the eager step's."""
from __future__ import annotations

import warnings

import pytest
import torch
from test_precision import recipe_for

from loraplex.lm import compiled
from loraplex.lm.compiled import packed_causal_attention
from loraplex.lm.packed import _packed_sdpa
from loraplex.models import load_model, resolve_base


class Attention:  # what transformers' sdpa attention reads from the module
    is_causal = True
    num_key_value_groups = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_causal_attention_equals_per_sequence_sdpa(dtype):
    """Values and q/k/v gradients of the operator equal the eager per-sequence path (3 sequences, one of them over
    `Kernels.float32_attention_below`, grouped-query heads)."""
    g = torch.Generator().manual_seed(0)
    lengths = (40, 300, 17)
    q, k, v = (torch.randn(1, heads, sum(lengths), 16, generator=g).to(dtype).requires_grad_() for heads in (6, 2, 2))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    reference, _ = _packed_sdpa(Attention(), q, k, v, None, position_ids=positions, scaling=0.25)
    out = packed_causal_attention(q, k, v, positions, 0.25)[0].transpose(1, 2)
    grad = torch.randn(reference.shape, generator=g).to(dtype)
    tolerance = {} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}  # bf16: `out` rounded before backward
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    for mine, theirs in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(reference, (q, k, v), grad)):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(mine, theirs, **tolerance)


def trained(tmp_path, tiny_model_dir, mode: str, steps: int = 3):
    """Losses of `steps` optimizer steps with train.compile `mode` (float32, no dropout) and the trainer."""
    from peft import get_peft_model

    from loraplex.lm.settings import lora_config
    from loraplex.pipeline import open_recipe
    from loraplex.training.trainer import make_trainer

    train = {"batch_size": 4, "max_steps": steps, "compile": mode, "max_grad_norm": 1e9}
    ws = open_recipe(recipe_for(tmp_path / mode, tiny_model_dir, "float32", train), only=["a"])
    spec = ws.recipe.dataset("a")
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(ws.base), lora_config(spec))
    trainer, _ = make_trainer(peft_model, spec, ws.prepare()["a"], tmp_path / f"ckpt-{mode}", progress=False)
    trainer.train()
    layer = peft_model.get_base_model().model.layers[0]
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], layer, peft_model


@pytest.mark.slow  # compiles a 2-layer model's forward and backward: ~20-40 s on 2 cores
def test_compiled_step_gives_the_eager_losses(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))  # its own inductor cache: a real compile
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    eager, eager_layer, _ = trained(tmp_path, tiny_model_dir, "off")
    compiled_losses, layer, model = trained(tmp_path, tiny_model_dir, "on")
    assert not isinstance(eager_layer.forward, compiled._LayerForward)
    assert isinstance(layer.forward, compiled._LayerForward) and not compiled._LayerForward.failed
    assert len(eager) == 3 and eager[0] != eager[-1]
    assert compiled_losses == pytest.approx(eager, rel=1e-4)  # float32: fused kernels sum in another order
    assert any((tmp_path / "home" / "compile").rglob("*.py")), "compiled code cached under $LORAPLEX_HOME"
    with torch.no_grad():  # outside training steps the layers run eagerly (no compile for evaluation)
        model.eval()(input_ids=torch.tensor([[5, 6, 7]]))


def test_a_failing_compile_trains_eagerly_after_one_warning(tmp_path, tiny_model_dir, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    eager, _, _ = trained(tmp_path, tiny_model_dir, "off", steps=2)
    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback, layer, _ = trained(tmp_path, tiny_model_dir, "on", steps=2)
    messages = [str(w.message) for w in caught if "train.compile" in str(w.message)]
    assert messages == ["train.compile: compiling the decoder layers failed (no C++ compiler found); training "
                        "continues eagerly (set train.compile: off to skip the attempt)"]
    assert compiled._LayerForward.failed and fallback == pytest.approx(eager, rel=1e-5)


def test_compile_applies_only_to_packed_per_sequence_training(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(resolve_base(str(tiny_model_dir))), LoraConfig(r=2, target_modules=["q_proj"]))
    assert compiled.compile_blocker(model, packing=True, per_sequence=True) is None
    assert "train.packing" in compiled.compile_blocker(model, packing=False, per_sequence=True)
    assert "train.packed_attention" in compiled.compile_blocker(model, packing=True, per_sequence=False)
    model.get_base_model().gradient_checkpointing_enable()
    assert "gradient checkpointing" in compiled.compile_blocker(model, packing=True, per_sequence=True)
