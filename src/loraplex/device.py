"""The machine: where models run, in which dtype (the one place that asks for CUDA and native bfloat16), and
where loraplex keeps its caches."""
from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def loraplex_home() -> Path:
    """Caches: converted models, tokenized data, locks (`$LORAPLEX_HOME`, default ~/.cache/loraplex)."""
    return Path(os.environ.get("LORAPLEX_HOME") or Path.home() / ".cache" / "loraplex")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def accelerator() -> str:
    """"cuda" where there is a GPU, else "cpu"."""
    return "cuda" if on_gpu() else "cpu"


def bf16_supported() -> bool:
    """True where bf16 matmuls run natively (CUDA bf16, or AVX512-BF16 / AMX on the CPU)."""
    if on_gpu():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def pick_dtype(name: str = "auto") -> torch.dtype:
    """A recipe's `model.dtype`: `auto` is bfloat16 where it runs natively, else float32."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def to_accelerator(model):
    """Move a full-precision model to the GPU where there is one (a quantized one is placed when loaded)."""
    return model.to("cuda") if on_gpu() else model
