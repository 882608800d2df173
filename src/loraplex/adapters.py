"""Several trained adapters side by side on one base model, switched by name (no reload, no nesting)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .errors import ModelError
from .models import BaseModelRef, base_fingerprint, load_model, load_tokenizer, pick_dtype, resolve_base
from .recipe import ModelSpec

ADAPTER_META = "loraplex.json"


def adapter_metadata(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_META
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is unreadable ({exc}); the adapter folder is damaged: train it again") from None


class AdapterSet:
    """One base model with named adapters loaded through PEFT's `load_adapter`.

    `use(name)` activates one adapter; `use(None)` (or `base()`) runs the untouched base.
    `base_precision` is "full", or the quantization the base was loaded with (e.g. "4bit nf4, ...").
    """

    def __init__(self, model, tokenizer, base: BaseModelRef, names: list[str], base_precision: str = "full"):
        self.model, self.tokenizer, self.base, self.names = model, tokenizer, base, names
        self.base_precision = base_precision
        self.active: str | None = names[0] if names else None

    def use(self, name: str | None) -> "AdapterSet":
        if name is not None and name not in self.names:
            raise ModelError(f"no adapter named '{name}'; loaded: {', '.join(self.names) or '(none)'}")
        if name is not None:
            self.model.set_adapter(name)
        self.active = name
        return self

    @contextlib.contextmanager
    def active_model(self):
        """The model to call for the active adapter (adapters disabled when none is active)."""
        if self.active is None and self.names:
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model


def load(base: str | BaseModelRef = "default", adapters: dict[str, str | Path] | None = None,
         dtype: str = "auto", check_fingerprint: bool = True, allow_pickle: bool = False,
         quantization: ModelSpec | None = None) -> AdapterSet:
    """Load the base once and each adapter under its name; refuse adapters trained on another base.

    Weights are read from safetensors only; `allow_pickle=True` also accepts pickled `.bin` files (which can run
    code when loaded: only for files from a source you trust).

    The base is loaded in full precision, where every adapter fits, QLoRA ones included (they record the
    full-precision base's fingerprint too). `quantization` (a recipe's `model:` block with `quantization` set)
    loads it quantized instead; an adapter trained on a quantized base is then checked against the
    fingerprint of the quantized weights it trained on.
    """
    from peft import PeftModel

    from .quantize import describe, quantization_config

    ref = base if isinstance(base, BaseModelRef) else resolve_base(base)
    adapters = adapters or {}
    for name, path in adapters.items():
        _check_adapter_files(name, Path(path), allow_pickle)
    config = quantization_config(quantization) if quantization is not None else None
    model = load_model(ref, pick_dtype(dtype), allow_pickle=allow_pickle, quantization_config=config)
    tokenizer = load_tokenizer(ref)
    precision = describe(quantization) if config is not None else "full"
    if check_fingerprint and adapters:
        for name, path in adapters.items():
            _check_fingerprint(name, Path(path), model, ref, precision)
    peft_model = None
    for name, path in adapters.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            peft_model.load_adapter(str(path), adapter_name=name)
    return AdapterSet(peft_model if peft_model is not None else model, tokenizer, ref, list(adapters), precision)


def _check_fingerprint(name: str, path: Path, model, ref: BaseModelRef, precision: str) -> None:
    """The base loaded must be the one the adapter recorded: full precision, or the same quantized weights."""
    meta = adapter_metadata(path)
    key = "base_fingerprint" if precision == "full" else "quantized_base_fingerprint"
    recorded = meta.get(key)  # a plain LoRA adapter records no quantized base: nothing to compare on a 4-bit load
    trained_dtype = getattr(torch, meta.get("dtype", ""), None)
    fingerprint = base_fingerprint(model, trained_dtype if isinstance(trained_dtype, torch.dtype) else None)
    if recorded and recorded != fingerprint:
        trained_on = meta.get("base_model", "another model")
        if precision != "full":
            trained_on += f" quantized as {meta.get('quantization', '?')}"
            loaded = f"{ref.name} quantized as {precision}"
        else:
            loaded = ref.name
        raise ModelError(f"adapter '{name}' ({path}) was trained on {trained_on} (fingerprint {recorded}), "
                         f"not on {loaded} (fingerprint {fingerprint}); load it with its own base")


def _check_adapter_files(name: str, path: Path, allow_pickle: bool) -> None:
    if (path / "adapter_model.safetensors").is_file():
        return
    if (path / "adapter_model.bin").is_file():
        if allow_pickle:
            return
        raise ModelError(f"adapter '{name}': {path} holds only adapter_model.bin, a pickle that can run code when "
                         "loaded; loraplex reads adapter_model.safetensors only. Re-save the adapter as safetensors, "
                         "or pass allow_pickle=True (--allow-pickle) if you trust its source")
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"adapter '{name}': {path} is not an adapter folder (no adapter_config.json); "
                         "point it at runs/<run>/adapters/<dataset>")
    raise ModelError(f"adapter '{name}': {path} has no adapter_model.safetensors; "
                     "it is incomplete: train the adapter again")
