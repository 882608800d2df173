"""The base model that adapters train on (and module selection measures on), loaded once per recipe."""
from __future__ import annotations

import torch

from ..device import dtype_name, to_accelerator
from ..models import base_fingerprint, load_model
from ..pipeline import Workspace
from ..quantize import describe, gradient_checkpointing, prepare_for_training, quantization_config


def load_base(ws: Workspace, allow_pickle: bool = False, on_device: bool = True) -> tuple[torch.nn.Module, dict]:
    """The base to train on (quantized if the recipe says so, prepared for training) and what each adapter records.

    `base_fingerprint` is always that of the full-precision weights, so every adapter, QLoRA included, loads
    onto the full-precision base; a quantized base is fingerprinted from a full-precision load first (freed
    before the quantized load), and the quantized weights' own fingerprint (packed codes and quantization
    state) is `quantized_base_fingerprint`. Fingerprints hash floating weights in the recipe's dtype, so
    prepare_model_for_kbit_training's float32 upcast of the non-quantized weights does not change them.
    Without `on_device` a full-precision base stays in CPU memory (FSDP moves only each process's shards).
    """
    spec = ws.recipe.model
    dtype = ws.dtype
    # checks that bitsandbytes runs here before anything is loaded
    config = quantization_config(spec, dtype, ws.recipe.distributed.strategy)
    record: dict = {"dtype": dtype_name(dtype)}
    if config is not None:
        full = load_model(ws.base, dtype, spec.trust_remote_code, allow_pickle=allow_pickle)
        record["base_fingerprint"] = base_fingerprint(full, dtype)
        del full
    model = load_model(ws.base, dtype, spec.trust_remote_code, allow_pickle=allow_pickle, quantization_config=config)
    if config is None and on_device:
        model = to_accelerator(model)  # a quantized base is loaded onto the GPU directly
    model = prepare_for_training(model, spec)
    fingerprint = base_fingerprint(model, dtype)
    record.setdefault("base_fingerprint", fingerprint)
    if config is not None:
        record.update(quantization=describe(spec, dtype), quantized_base_fingerprint=fingerprint)
    record["gradient_checkpointing"] = gradient_checkpointing(spec)
    return model, record
