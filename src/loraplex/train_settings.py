"""A dataset's `train:` block: steps, learning rate, batches, checkpoints and how each batch runs."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs when set")
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0, description="sequences per optimizer micro-step")
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(50, gt=0, description="checkpoint every N optimizer steps (what `resume` continues from)")
    packing: bool = Field(True, description="padding-free packing of each batch (else padded batches)")
    packed_attention: Literal["per_sequence", "masked"] = Field(
        "per_sequence", description="with sdpa attention, a packed row attends per sequence through SDPA's causal "
        "kernel ('per_sequence'), or through one block-diagonal mask over the whole row ('masked', slower)")
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="most tokens in one forward/backward pass: a larger packed batch runs as several "
        "passes of whole sequences whose gradients add up to the same step (lower = less memory); default: "
        "max(max_seq_length, 512) on CPU, the whole batch on GPU")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="compile the decoder layers and their LoRA branches with TorchInductor ('on'), or run "
        "them eagerly ('off'); 'auto' is off for now: measured not faster on CPUs, unmeasured on GPUs "
        "(benchmarks/README.md). Applies to packed batches with "
        "per-sequence attention, without quantization or gradient checkpointing; if compiling fails, the step runs "
        "eagerly after one warning")
