"""A dataset entry's settings as the language-model core takes them: its PEFT LoraConfig and its tokens per pass."""
from __future__ import annotations

from ..device import on_gpu
from ..lora_settings import LoraSettings
from ..recipe import DatasetSpec

CPU_MIN_PASS_TOKENS = 512  # below this, CPU matmuls are too small to run at full speed


def micro_batch_tokens(spec: DatasetSpec) -> int | None:
    """Tokens per forward/backward pass. On a GPU the whole batch. On CPU at most max(max_seq_length, 512)
    (benchmarks/README.md): at max_seq_length 512, batches of 4 as 512-token passes ran at 1.10x the float32
    notebook baseline with 0.94x its peak RSS, one whole-batch pass at 1.11x with 1.17x; on the demo data,
    128-token passes ran at 160 tokens/s against 213 for 512-token and 215 for 1024-token passes."""
    if spec.train.micro_batch_tokens is not None:
        return spec.train.micro_batch_tokens
    return None if on_gpu() else max(spec.max_seq_length, CPU_MIN_PASS_TOKENS)


def lora_config(spec: DatasetSpec, variant: bool = True):
    """PEFT's LoraConfig for one dataset entry; `variant=False`: plain LoRA (default init, no per-module patterns)."""
    from peft import LoraConfig

    lora = spec.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                      use_rslora=lora.use_rslora, use_dora=lora.use_dora, target_modules=spec.target_modules,
                      layers_to_transform=lora.layers_to_transform, task_type="CAUSAL_LM",
                      **(peft_options(lora) if variant else {}))


def peft_options(lora: LoraSettings) -> dict:
    """LoraConfig's keyword arguments for the variant (LoftQ starts as default LoRA: `inject` replaces A and B)."""
    from peft.tuners.lora.config import CordaConfig, EvaConfig

    init = True if lora.init in ("default", "loftq") else lora.init
    options: dict = {"init_lora_weights": init, "rank_pattern": dict(lora.rank_pattern),
                     "alpha_pattern": dict(lora.alpha_pattern)}
    if lora.init == "eva":
        options["eva_config"] = EvaConfig()
    if lora.init == "corda":
        options["corda_config"] = CordaConfig(corda_method="ipm")  # instruction-previewed: fit the task's inputs
    return options
