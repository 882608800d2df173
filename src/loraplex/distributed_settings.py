"""The recipe's `distributed:` block: how several training processes share the work (`--nproc`, a launcher)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

STRATEGIES = ("ddp", "fsdp", "deepspeed")


class DistributedSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="with several processes: 'ddp' (every process holds the whole base), 'fsdp' (FSDP2: each "
        "decoder layer's weights sharded over the processes and gathered for its forward and backward; bfloat16 "
        "compute with a bfloat16 base), 'deepspeed' (ZeRO-3, GPU only); one process ignores it")


def strategy_problems(settings: DistributedSettings, quantization: str | None, on_gpu: bool) -> list[str]:
    """Why `settings` cannot run here (empty when it can): a strategy this machine or the quantization rules out."""
    strategy = settings.strategy
    if strategy == "deepspeed":
        return ["distributed.strategy: 'deepspeed' is not available in this version of loraplex; use 'fsdp' "
                "(FSDP2 shards the base the same way) or 'ddp'"]
    if strategy == "fsdp" and quantization == "8bit":
        return ["distributed.strategy: 'fsdp' with model.quantization: 8bit cannot shard LLM.int8 weights; use "
                "model.quantization: 4bit (QLoRA) or strategy 'ddp'"]
    if strategy == "fsdp" and quantization == "4bit" and not on_gpu:
        return ["distributed.strategy: 'fsdp' with model.quantization: 4bit needs CUDA (bitsandbytes' 4-bit weights "
                "are sharded only on a GPU, stored in the compute dtype); on this CPU use strategy 'ddp' or drop "
                "model.quantization"]
    return []
