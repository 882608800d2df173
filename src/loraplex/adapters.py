"""Several trained adapters side by side on one base model, switched by name (no reload, no nesting)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .errors import ModelError
from .models import BaseModelRef, base_fingerprint, load_model, load_tokenizer, pick_dtype, resolve_base

ADAPTER_META = "loraplex.json"


def adapter_metadata(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_META
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class AdapterSet:
    """One base model with named adapters loaded through PEFT's `load_adapter`.

    `use(name)` activates one adapter; `use(None)` (or `base()`) runs the untouched base.
    """

    def __init__(self, model, tokenizer, base: BaseModelRef, names: list[str]):
        self.model, self.tokenizer, self.base, self.names = model, tokenizer, base, names
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
         dtype: str = "auto", check_fingerprint: bool = True) -> AdapterSet:
    """Load the base once and each adapter under its name; refuse adapters trained on another base."""
    from peft import PeftModel

    ref = base if isinstance(base, BaseModelRef) else resolve_base(base)
    model = load_model(ref, pick_dtype(dtype))
    tokenizer = load_tokenizer(ref)
    adapters = adapters or {}
    if check_fingerprint and adapters:
        fingerprint = base_fingerprint(model)
        for name, path in adapters.items():
            recorded = adapter_metadata(Path(path)).get("base_fingerprint")
            if recorded and recorded != fingerprint:
                trained_on = adapter_metadata(Path(path)).get("base_model", "another model")
                raise ModelError(f"adapter '{name}' ({path}) was trained on {trained_on} (fingerprint {recorded}), "
                                 f"not on {ref.name} (fingerprint {fingerprint}); load it with its own base")
    peft_model = None
    for name, path in adapters.items():
        if not (Path(path) / "adapter_model.safetensors").is_file():
            raise ModelError(f"adapter '{name}': {path} has no adapter_model.safetensors")
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            peft_model.load_adapter(str(path), adapter_name=name)
    return AdapterSet(peft_model if peft_model is not None else model, tokenizer, ref, list(adapters))
