"""`train.compile`: the decoder layers, with their LoRA branches, compiled by TorchInductor.

Per-sequence attention (`packed._packed_sdpa`) loops over a packed row's sequences in Python, which breaks a
traced graph at every layer. Here it is one opaque operator, `loraplex::packed_causal_attention`, taking the row's
position ids: inside, the same per-sequence causal flash-attention kernels (float32 for short bfloat16 sequences
on a CPU), and its own backward from the saved outputs and log-sum-exps. Around it, each decoder layer (RMSNorm,
rotary, projections and LoRA branches, SiLU, residual adds) compiles to one forward and one backward graph whose
element-wise work is fused; the row's length is a dynamic dimension, so passes of other lengths reuse the graph,
and every layer reuses the first layer's graph. Compiled code is cached under `$LORAPLEX_HOME/compile/`, so a
later run on the same model shapes loads it instead of compiling.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch
from torch import Tensor

from ..device import loraplex_home
from .packed import _starts, attention_in_float32, causal_lm

COMPILED_SDPA = "loraplex_compiled_packed_sdpa"  # the attention implementation name registered with transformers


def _bounds(position_ids: Tensor, length: int) -> list[int]:
    return _starts(position_ids[0]) + [length]


def _repeat_heads(x: Tensor, groups: int) -> Tensor:
    """[1, kv_heads, T, D] -> [1, kv_heads * groups, T, D] (grouped-query attention)."""
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


@torch.library.custom_op("loraplex::packed_causal_attention", mutates_args=())
def packed_causal_attention(query: Tensor, key: Tensor, value: Tensor, position_ids: Tensor,
                            scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention of each sequence of a packed row. q [1, Hq, T, D], k/v [1, Hkv, T, D] -> output
    [1, Hq, T, D] and float32 log-sum-exps [1, Hq, T] (what the backward needs)."""
    groups = query.shape[1] // key.shape[1]
    out, lse = torch.empty_like(query), query.new_empty(query.shape[:3], dtype=torch.float32)
    bounds = _bounds(position_ids, query.shape[2])
    for a, b in zip(bounds, bounds[1:]):
        q, k, v = query[:, :, a:b], _repeat_heads(key[:, :, a:b], groups), _repeat_heads(value[:, :, a:b], groups)
        if attention_in_float32(query, b - a):
            q, k, v = q.float(), k.float(), v.float()
        part, part_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        out[:, :, a:b], lse[:, :, a:b] = part, part_lse
    return out, lse


@packed_causal_attention.register_fake
def _(query, key, value, position_ids, scale):
    return torch.empty_like(query), query.new_empty(query.shape[:3], dtype=torch.float32)


@torch.library.custom_op("loraplex::packed_causal_attention_backward", mutates_args=())
def packed_causal_attention_backward(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                                     lse: Tensor, position_ids: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `packed_causal_attention` w.r.t. q, k, v, per sequence (k/v summed over each head group)."""
    groups = query.shape[1] // key.shape[1]
    grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    bounds = _bounds(position_ids, query.shape[2])
    for a, b in zip(bounds, bounds[1:]):
        tensors = [grad[:, :, a:b], query[:, :, a:b], _repeat_heads(key[:, :, a:b], groups),
                   _repeat_heads(value[:, :, a:b], groups), out[:, :, a:b]]
        if attention_in_float32(query, b - a):
            tensors = [t.float() for t in tensors]
        g, q, k, v, o = tensors
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, o, lse[:, :, a:b], 0.0, True, scale=scale)
        heads = key.shape[1]
        grad_q[:, :, a:b] = dq
        grad_k[:, :, a:b] = dk.unflatten(1, (heads, groups)).sum(2)
        grad_v[:, :, a:b] = dv.unflatten(1, (heads, groups)).sum(2)
    return grad_q, grad_k, grad_v


@packed_causal_attention_backward.register_fake
def _(grad, query, key, value, out, lse, position_ids, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, position_ids, scale = inputs
    ctx.save_for_backward(query, key, value, output[0], output[1], position_ids)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, position_ids = ctx.saved_tensors
    grads = packed_causal_attention_backward(grad_out.contiguous(), query, key, value, out, lse, position_ids,
                                             ctx.scale)
    return *grads, None, None


packed_causal_attention.register_autograd(_backward, setup_context=_setup_context)


def _compiled_packed_sdpa(module, query, key, value, attention_mask, position_ids=None, scaling=None, **kwargs):
    """transformers' attention interface over `packed_causal_attention`: q/k/v [1, heads, T, D] -> [1, T, heads, D]."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, _ = packed_causal_attention(query.contiguous(), key.contiguous(), value.contiguous(), position_ids, scale)
    return out.transpose(1, 2), None


def decoder_layers(lm) -> torch.nn.ModuleList | None:
    """The decoder's repeated layers (`model.layers` in Llama-style models), or None."""
    layers = getattr(getattr(lm, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def _dynamic_tokens(args: tuple, kwargs: dict) -> None:
    """Mark the token dimension (1) of the layer's tensors dynamic: one graph for passes of every length."""
    cos_sin = kwargs.get("position_embeddings") or ()
    for t in (*args[:1], kwargs.get("hidden_states"), kwargs.get("position_ids"), *cos_sin):
        if isinstance(t, Tensor) and t.dim() > 1:
            torch._dynamo.maybe_mark_dynamic(t, 1)


def compile_blocker(model, packing: bool, per_sequence: bool) -> str | None:
    """Why the layers of `model` cannot be compiled for training (None: they can)."""
    lm = causal_lm(model)
    if not packing or not per_sequence:
        return "it needs packed batches with per-sequence attention (train.packing, train.packed_attention)"
    if lm.config._attn_implementation != "sdpa":
        return f"it needs sdpa attention (the model uses {lm.config._attn_implementation})"
    layers = decoder_layers(lm)
    if layers is None:
        return f"{type(lm).__name__} has no decoder layers to compile (model.layers)"
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        return "it does not combine with gradient checkpointing (model.gradient_checkpointing)"
    if getattr(lm, "hf_quantizer", None) is not None:
        return "it does not combine with a quantized base (model.quantization)"
    return None


class _LayerForward:
    """A decoder layer's forward: compiled at the first call, eager from the first compile failure on."""

    failed = False  # one failure switches every layer back (each would fail the same way)
    active = False  # set by `compiled_attention`: outside training passes (evaluation, generation) layers run eagerly

    def __init__(self, eager):
        self.eager = eager
        self.compiled = torch.compile(eager, dynamic=None)

    def __call__(self, *args, **kwargs):
        if _LayerForward.failed or not _LayerForward.active:
            return self.eager(*args, **kwargs)
        _dynamic_tokens(args, kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any compiler failure: train eagerly instead
            _LayerForward.failed = True
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            warnings.warn(f"train.compile: compiling the decoder layers failed ({first_line[:200]}); "
                          "training continues eagerly (set train.compile: off to skip the attempt)", stacklevel=2)
            return self.eager(*args, **kwargs)


def compile_layers(lm) -> None:
    """Replace each decoder layer's forward by its compiled form (compiled at the first pass, every layer sharing
    one graph); compiled code is cached under $LORAPLEX_HOME/compile/."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(loraplex_home() / "compile" / "inductor"))
    _LayerForward.failed = False
    for layer in decoder_layers(causal_lm(lm)):
        if not isinstance(layer.forward, _LayerForward):
            layer.forward = _LayerForward(layer.forward)


@contextmanager
def compiled_attention(model, batch: dict[str, Tensor]):
    """Within the block, a packed row attends per sequence in a form the compiled layers trace: on a CPU through
    `packed_causal_attention`; on a GPU through transformers' flex attention, whose block mask (causal within
    each sequence) transformers builds once per pass from the position ids."""
    from transformers import AttentionInterface

    config = causal_lm(model).config
    if "position_ids" not in batch or "attention_mask" in batch or config._attn_implementation != "sdpa":
        yield
        return
    _LayerForward.active = True
    if batch["input_ids"].device.type == "cpu":
        AttentionInterface.register(COMPILED_SDPA, _compiled_packed_sdpa)
        config._attn_implementation = COMPILED_SDPA
    else:
        config._attn_implementation = "flex_attention"
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
        _LayerForward.active = False
