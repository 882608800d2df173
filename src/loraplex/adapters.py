"""Several trained adapters side by side on one base model, switched by name (no reload, no nesting)."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelError
from .device import pick_dtype
from .models import BaseModelRef, load_model, load_tokenizer, resolve_base
from .quantize import describe, quantization_config
from .recipe import ModelSpec
from .run import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_metadata, check_base, compose_problems


class AdapterSet:
    """One base model with named adapters loaded through PEFT's `load_adapter`.

    `use(name)` activates one adapter on `model`; `use(None)` turns every adapter off, so `model` runs the
    untouched base. `base_precision` is "full", or the quantization the base was loaded with (e.g. "4bit nf4, ...").
    """

    def __init__(self, model, tokenizer, base: BaseModelRef, names: list[str], base_precision: str = "full"):
        self.model, self.tokenizer, self.base, self.names = model, tokenizer, base, names
        self.base_precision = base_precision
        self.active: str | None = names[0] if names else None

    def use(self, name: str | None) -> "AdapterSet":
        if name is not None and name not in self.names:
            raise ModelError(f"no adapter named '{name}'; loaded: {', '.join(self.names) or '(none)'}")
        if self.names:
            if name is None:
                self.model.base_model.disable_adapter_layers()
            else:
                self.model.base_model.enable_adapter_layers()
                self.model.set_adapter(name)
        self.active = name
        return self


def load(base: str | BaseModelRef = "default", adapters: dict[str, str | Path] | None = None,
         dtype: str | torch.dtype = "auto", check_fingerprint: bool = True, allow_pickle: bool = False,
         quantization: ModelSpec | None = None) -> AdapterSet:
    """Load the base once and each adapter under its name; refuse adapters trained on another base.

    Weights are read from safetensors only; `allow_pickle=True` also accepts pickled `.bin` files (which can run
    code when loaded: only for files from a source you trust).

    The base is loaded in full precision, where every adapter fits, QLoRA ones included (they record the
    full-precision base's fingerprint too), in `dtype` whatever dtype the adapters trained in: each adapter is
    checked against the base as it trained on it (`dtype`: a torch.dtype, or a recipe's name for one).
    `quantization` (a recipe's `model:` block with `quantization` set) loads the base quantized instead; an adapter
    trained on a quantized base is then checked against the
    fingerprint of the quantized weights it trained on.
    """
    ref = base if isinstance(base, BaseModelRef) else resolve_base(base)
    adapters = {name: Path(path) for name, path in (adapters or {}).items()}
    for name, path in adapters.items():
        _check_adapter_files(name, path, allow_pickle)
    stale = compose_problems(adapters)
    if stale:
        raise ModelError(stale, title="adapters trained on top of adapters that changed" if len(stale) > 1 else None)
    dtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype)  # resolved once, here
    config = quantization_config(quantization, dtype) if quantization is not None else None
    model = load_model(ref, dtype, allow_pickle=allow_pickle, quantization_config=config)
    tokenizer = load_tokenizer(ref)
    precision = describe(quantization, dtype) if config is not None else "full"
    if check_fingerprint and adapters:
        check_base(model, ref, adapters, quantization if config is not None else None, dtype)
    return AdapterSet(attach(model, adapters), tokenizer, ref, list(adapters), precision)


def attach(model, adapters: dict[str, Path]):
    """Each adapter loaded onto `model` by PEFT under its name (the first wraps the model in a PeftModel)."""
    from peft import PeftModel

    peft_model = None
    for name, path in adapters.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            peft_model.load_adapter(str(path), adapter_name=name)
    return peft_model if peft_model is not None else model


def _check_adapter_files(name: str, path: Path, allow_pickle: bool) -> None:
    if (path / ADAPTER_WEIGHTS).is_file():
        return
    if (path / "adapter_model.bin").is_file():
        if allow_pickle:
            return
        raise ModelError(f"adapter '{name}': {path} holds only adapter_model.bin, a pickle that can run code when "
                         "loaded; loraplex reads adapter_model.safetensors only. Re-save the adapter as safetensors, "
                         "or pass allow_pickle=True if you trust its source")
    if not (path / ADAPTER_CONFIG).is_file():
        raise ModelError(f"adapter '{name}': {path} is not an adapter folder (no adapter_config.json); "
                         "point it at runs/<run>/adapters/<dataset>")
    raise ModelError(f"adapter '{name}': {path} has no adapter_model.safetensors; "
                     "it is incomplete: train the adapter again")


__all__ = ["AdapterSet", "adapter_metadata", "load"]
