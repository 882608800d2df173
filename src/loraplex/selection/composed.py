"""The model a `compose_with` adapter trains in, for its `target_modules: auto` decision: the base with the
adapters it is composed with loaded, active and frozen. Deciding on the pristine base would choose modules for
another model than the one the adapter trains in (a composed adapter may open paths the base closes)."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

from ..adapters import attach
from ..errors import LoraplexError
from ..recipe import DatasetSpec
from ..run import ADAPTER_WEIGHTS, adapter_dir, is_complete


def weights_hashes(folders: dict[str, Path]) -> dict[str, str]:
    """name -> sha256 of the adapter's safetensors file (what the decision depends on)."""
    return {name: hashlib.sha256((folder / ADAPTER_WEIGHTS).read_bytes()).hexdigest()[:16]
            for name, folder in folders.items()}


def composed_folders(spec: DatasetSpec, run_dir: Path) -> dict[str, Path]:
    """name -> folder of each adapter `spec` is composed with; refuses when one is not trained yet."""
    missing = [n for n in spec.compose_with if not is_complete(adapter_dir(run_dir, n))]
    if missing:
        raise LoraplexError(f"datasets[{spec.name}].compose_with: {', '.join(missing)} not trained yet in {run_dir}; "
                            f"train {'them' if len(missing) > 1 else 'it'} first (or leave only=None)")
    return {name: adapter_dir(run_dir, name) for name in spec.compose_with}


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
