"""Quantized base models (QLoRA): 4-bit NF4/FP4 or 8-bit weights through bitsandbytes.

`model.quantization: 4bit` loads every linear layer of the base except the LM head as a bitsandbytes
`Linear4bit`: two 4-bit codes per byte, one absmax per block of 64 weights (with double quantization those
absmax values are themselves stored in 8 bit, one float32 per 256 blocks), de-quantized to the compute
dtype inside each matmul. The LoRA weights stay full precision, so a QLoRA adapter is an ordinary PEFT
adapter: it loads onto the full-precision base as well, and merging always writes into the full-precision
weights, never into the 4-bit ones.

Training on a k-bit base goes through PEFT's `prepare_model_for_kbit_training` (frozen base, non-quantized
weights cast to float32, gradient checkpointing).
"""
from __future__ import annotations

import functools
import platform
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from .device import accelerator, dtype_name
from .errors import ModelError
from .recipe import ModelSpec

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

MIN_BITSANDBYTES = "0.45"
INSTALL_COMMAND = f"pip install 'bitsandbytes>={MIN_BITSANDBYTES}'"  # or: pip install 'loraplex[qlora]'


def require_bitsandbytes(quantization: str = "4bit") -> str:
    """The installed bitsandbytes version, checked to import and run a `quantization` layer on this machine."""
    try:
        import bitsandbytes
    except ModuleNotFoundError as exc:
        if exc.name != "bitsandbytes":
            raise _cannot_run(quantization, "?", exc) from None
        raise ModelError(f"model.quantization: {quantization} needs the package bitsandbytes, which is not "
                         f"installed; install it with `{INSTALL_COMMAND}` (or `pip install 'loraplex[qlora]'`), "
                         "or remove model.quantization to train plain LoRA") from None
    except Exception as exc:  # a build without this platform's native library raises OSError, RuntimeError, ...
        raise _cannot_run(quantization, "?", exc) from None
    from packaging.version import Version

    version = getattr(bitsandbytes, "__version__", "0")
    if Version(version) < Version(MIN_BITSANDBYTES):
        raise ModelError(f"model.quantization: bitsandbytes {version} is too old (loraplex needs >= "
                         f"{MIN_BITSANDBYTES}, the first release that runs on the CPU too); "
                         f"upgrade with `pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'`")
    _smoke_test(quantization, accelerator(), version)
    return version


@functools.lru_cache(maxsize=None)
def _smoke_test(quantization: str, device: str, version: str) -> None:
    """One tiny quantized layer, forward and backward: import succeeding does not mean the kernels run here."""
    import bitsandbytes as bnb

    try:
        torch.manual_seed(0)
        weight = torch.randn(64, 64)
        if quantization == "4bit":
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer = layer.to(device)  # quantizes
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).float().sum().backward()
        if not torch.isfinite(x.grad).all():
            raise RuntimeError("a quantized matmul returned non-finite values")
    except Exception as exc:
        raise _cannot_run(quantization, version, exc, device) from None


def _cannot_run(quantization: str, version: str, exc: Exception, device: str | None = None) -> ModelError:
    where = device or accelerator()
    machine = f"{platform.system()} {platform.machine()}, torch {torch.__version__}, {where}"
    reason = f"{type(exc).__name__}: {str(exc).strip() or '(no message)'}"
    return ModelError(f"model.quantization: {quantization}: bitsandbytes {version} cannot run on this machine "
                      f"({machine}): {reason}. {quantization} loading needs a bitsandbytes build with CPU or CUDA "
                      f"support for this platform (`pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'`); "
                      "or remove model.quantization to train plain LoRA")


def platform_error(config: BitsAndBytesConfig, exc: Exception) -> ModelError:
    """A quantized load that failed inside transformers/bitsandbytes, as the one-line platform error."""
    try:
        import bitsandbytes

        version = bitsandbytes.__version__
    except Exception:
        version = "?"
    return _cannot_run("8bit" if getattr(config, "load_in_8bit", False) else "4bit", version, exc)


def quantization_config(spec: ModelSpec, dtype: torch.dtype, strategy: str = "ddp") -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for a recipe's `model:` block (None without quantization).

    The compute dtype is `dtype`, the workspace's (`pipeline.Workspace.dtype`: the recipe's `dtype` resolved, `auto`
    being bfloat16 where the hardware runs it natively, else float32). For FSDP (`strategy` 'fsdp') the packed 4-bit
    codes are stored in the compute dtype, so that FSDP shards and gathers them with the base's other weights.
    """
    if spec.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(spec.quantization)
    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = {"bnb_4bit_quant_storage": dtype} if strategy == "fsdp" else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_compute_dtype=dtype, **storage)


def describe(spec: ModelSpec, dtype: torch.dtype) -> str | None:
    """'4bit nf4, double quantization, compute float32' (None without quantization; `dtype`: the compute dtype)."""
    if spec.quantization is None:
        return None
    if spec.quantization == "8bit":
        return "8bit (LLM.int8)"
    double = ", double quantization" if spec.double_quant else ""
    return f"4bit {spec.quant_type}{double}, compute {dtype_name(dtype)}"


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def gradient_checkpointing(spec: ModelSpec) -> bool:
    """`model.gradient_checkpointing`, by default on with quantization (QLoRA's memory budget) and off without."""
    return spec.gradient_checkpointing if spec.gradient_checkpointing is not None else spec.quantization is not None


def prepare_for_training(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """A k-bit base through PEFT's prepare_model_for_kbit_training; gradient checkpointing where asked for.

    Non-reentrant checkpointing needs no gradient on the embeddings' output (no input-grad hook).
    """
    checkpointing = gradient_checkpointing(spec)
    kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():  # transformers 5 renamed gradient_checkpointing_enable; PEFT calls the old name
        warnings.filterwarnings("ignore", message=".*checkpointing.*deprecated.*", category=FutureWarning)
        if is_quantized(model):
            from peft import prepare_model_for_kbit_training

            return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                   gradient_checkpointing_kwargs=kwargs)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def cpu_repack_hardware() -> bool:
    """True where bitsandbytes would repack 4-bit layers for inference on the CPU (it found AVX512-BF16)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except Exception:  # no bitsandbytes, or one that cannot load its native library here
        return False
    return bool(has_avx512bf16())


def keep_one_layout(model: nn.Module) -> int:
    """Keep every 4-bit layer in the layout it trains in; returns how many layers were switched off the CPU repack.

    On a CPU with AVX512-BF16, bitsandbytes repacks a `Linear4bit` on its first forward in eval mode without
    gradients (held-out loss, generation) into an inference layout: absmax rounded to bfloat16 and double
    quantization undone, so the weights de-quantize to other values (the base "changes"), and a later training
    forward runs a kernel with no backward. With the repack off, training, evaluation and the fingerprints
    all see the same weights on every CPU.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def copy_out_of_checkpoint_file(model: nn.Module) -> None:
    """Copy the full-precision weights of a model quantized on the CPU out of the memory-mapped checkpoint.

    On the CPU, transformers leaves loaded weights as views of the memory-mapped safetensors file. Quantizing
    reads every page of it, and the few weights left in full precision (embeddings, norms, LM head) then keep
    the whole file resident. Copying those out lets the mapping go (SmolLM2-135M: about 300 MB less RSS).
    """
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False):
            if type(param).__name__ not in ("Params4bit", "Int8Params"):
                param.data = param.data.clone()
