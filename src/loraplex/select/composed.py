"""The model a `compose_with` adapter trains in, for its `target_modules: auto` decision: the base with the
adapters it is composed with loaded, active and frozen. Deciding on the pristine base would choose modules for
another model than the one the adapter trains in (a composed adapter may open paths the base closes)."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

from ..adapters import attach
from ..run import ADAPTER_WEIGHTS


def weights_hashes(folders: dict[str, Path]) -> dict[str, str]:
    """name -> sha256 of the adapter's safetensors file (what the decision depends on)."""
    return {name: hashlib.sha256((folder / ADAPTER_WEIGHTS).read_bytes()).hexdigest()[:16]
            for name, folder in folders.items()}


@contextmanager
def composed_model(model, folders: dict[str, Path]):
    """`model` with the adapters in `folders` loaded, active and frozen (`model` itself when there are none);
    they are unloaded at the end, never merged, which leaves the base as it was."""
    if not folders:
        yield model
        return
    peft_model = attach(model, folders)
    peft_model.base_model.set_adapter(list(folders))
    for param in peft_model.parameters():  # set_adapter makes the active adapters trainable
        param.requires_grad_(False)
    try:
        yield peft_model
    finally:
        peft_model.unload()


def composed_names(model) -> list[str]:
    """The adapters already loaded on `model` (a PeftModel from `composed_model`), else []."""
    return list(getattr(model, "peft_config", {}) or {})
