"""The recipe's `distributed:` block: how several training processes share the work (`--nproc`, a launcher)."""
from __future__ import annotations

import importlib.util
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

STRATEGIES = ("ddp", "fsdp", "deepspeed")


class DistributedSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="with several processes: 'ddp' (every process holds the whole base), 'fsdp' (FSDP2: each "
        "decoder layer's weights sharded over the processes and gathered for its forward and backward; bfloat16 "
        "compute with a bfloat16 base), 'deepspeed' (DeepSpeed ZeRO-3: the same sharding of base, adapter and "
        "optimizer state, through DeepSpeed's engine; needs `pip install 'loraplex[deepspeed]'`); one process "
        "ignores it")


def strategy_problems(settings: DistributedSettings, quantization: str | None, on_gpu: bool) -> list[str]:
    """Why `settings` cannot run here (empty when it can): a strategy this machine or the quantization rules out."""
    strategy = settings.strategy
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" and strategy != "deepspeed":
        return [f"this launch has an accelerate DeepSpeed ZeRO-3 configuration, but distributed.strategy is "
                f"'{strategy}': set distributed.strategy: deepspeed (loraplex then runs ZeRO-3 itself; launch with "
                "--nproc or a DDP configuration)"]
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return ["distributed.strategy: 'deepspeed' needs DeepSpeed: pip install 'loraplex[deepspeed]' (or use "
                "'fsdp', which shards the base the same way with torch alone)"]
    if strategy == "deepspeed" and quantization is not None:
        return [f"distributed.strategy: 'deepspeed' with model.quantization: {quantization} is not supported; use "
                "strategy 'fsdp' for QLoRA on a sharded base, or drop model.quantization"]
    if strategy == "fsdp" and quantization == "8bit":
        return ["distributed.strategy: 'fsdp' with model.quantization: 8bit cannot shard LLM.int8 weights; use "
                "model.quantization: 4bit (QLoRA) or strategy 'ddp'"]
    if strategy == "fsdp" and quantization == "4bit" and not on_gpu:
        return ["distributed.strategy: 'fsdp' with model.quantization: 4bit needs CUDA (bitsandbytes' 4-bit weights "
                "are sharded only on a GPU, stored in the compute dtype); on this CPU use strategy 'ddp' or drop "
                "model.quantization"]
    return []
