"""A dataset's `lora:` block: rank, scaling, dropout, and the variant (how A and B start, LoRA+, per-module
ranks and alphas).

Every variant is PEFT's (`LoraConfig.init_lora_weights`, `rank_pattern`, `alpha_pattern`,
`peft.optimizers.create_loraplus_optimizer`); `training.variants` runs them. This module holds what a recipe
may say and what it may not combine, with the reason.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INITS = ("default", "gaussian", "pissa", "olora", "eva", "loftq", "corda")
# PiSSA, OLoRA and CorDA start from the base weight's own components and subtract them from it at init
# (W_res = W - s·B0@A0); loraplex puts the base back and saves the adapter as a plain LoRA against it
BASE_REWRITING = ("pissa", "olora", "corda")
DATA_DRIVEN = ("eva", "corda")  # computed from the dataset's training rows
INIT_NAMES = {"default": "LoRA", "gaussian": "LoRA (Gaussian A)", "pissa": "PiSSA", "olora": "OLoRA", "eva": "EVA",
              "loftq": "LoftQ", "corda": "CorDA"}
VARIANT_FIELDS = ("init", "loraplus_lr_ratio", "rank_pattern", "alpha_pattern")  # absent from older recipes


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="lora_alpha; scaling = alpha / r (alpha / sqrt(r) with rsLoRA)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    layers_to_transform: list[int] | None = Field(None, description="only these layer indices get LoRA")
    init: Literal[INITS] = Field(  # type: ignore[valid-type]
        "default", description="how A and B start: default (A Kaiming-uniform, B = 0), gaussian (A ~ N(0, 1/r)), "
        "pissa / olora (the base weight's principal components / QR factors), eva (SVD of the layers' inputs on this "
        "dataset's training rows), corda (the weight's components weighted by those inputs' covariance), loftq "
        "(4-bit base only: Q(W) + s·B@A close to W). pissa, olora and corda are saved as a plain LoRA of rank 2r "
        "against the untouched base")
    loraplus_lr_ratio: float | None = Field(
        None, ge=1, description="LoRA+: B's learning rate is train.lr times this (A's stays train.lr); e.g. 16")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="module name or regex -> its own rank (PEFT's rank_pattern), e.g. "
        "{'layers.0.self_attn.q_proj': 32}")
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="module name or regex -> its own lora_alpha (PEFT's alpha_pattern)")

    @model_validator(mode="after")
    def _combinations(self) -> "LoraSettings":
        problems = combination_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def fingerprint_dict(self) -> dict:
        """The settings as JSON, without variant fields left at their defaults: an adapter trained before they
        existed keeps its fingerprint."""
        return without_default_variant(self.model_dump(mode="json"))


def combination_problems(lora: LoraSettings) -> list[str]:
    """What PEFT cannot do with these settings together, each with the fix."""
    problems = [f"rank_pattern['{k}']: rank {v} must be at least 1" for k, v in lora.rank_pattern.items() if v < 1]
    problems += [f"alpha_pattern['{k}']: alpha {v} must be positive" for k, v in lora.alpha_pattern.items() if v <= 0]
    if lora.init in BASE_REWRITING + ("loftq",) and lora.use_dora:
        problems.append(f"init {lora.init} with use_dora: DoRA's magnitude belongs to the rewritten base weight, so "
                        "the adapter cannot be saved against the untouched base; use one of them")
    if lora.init in BASE_REWRITING and lora.use_rslora and (lora.rank_pattern or lora.alpha_pattern):
        problems.append(f"init {lora.init} with use_rslora and rank_pattern/alpha_pattern: PEFT cannot convert such "
                        "an adapter to a plain LoRA against the untouched base; drop use_rslora or the patterns")
    return problems


def quantization_problems(lora: LoraSettings, quantization: str | None, where: str) -> list[str]:
    """The inits a (non-)quantized base rules out, one line each with the reason and the fix."""
    if quantization is None and lora.init == "loftq":
        return [f"{where}.lora.init: loftq initializes LoRA against a 4-bit base (Q(W) + s·B@A close to W); set "
                "model.quantization: 4bit, or choose another init"]
    if quantization == "8bit" and lora.init == "loftq":
        return [f"{where}.lora.init: loftq needs model.quantization: 4bit (PEFT's LoftQ replaces 4-bit layers only)"]
    if quantization is not None and lora.init in BASE_REWRITING:
        return [f"{where}.lora.init: {lora.init} rewrites the base weights at init; on a {quantization} base PEFT "
                "re-quantizes them (or cannot), so the adapter would not be exact against the untouched base. Train "
                "it on the full-precision base (model.quantization: none), or use eva, loftq or gaussian"]
    return []


def without_default_variant(lora: dict) -> dict:
    """A dumped `lora:` block without the variant fields left at their defaults."""
    defaults = {"init": "default", "loraplus_lr_ratio": None, "rank_pattern": {}, "alpha_pattern": {}}
    return {k: v for k, v in lora.items() if not (k in defaults and v == defaults[k])}


def adapter_variant(meta: dict) -> str:
    """The variant an adapter trained with, from its loraplex.json ('LoRA' for one loraplex did not train)."""
    return variant_name((meta.get("config") or {}).get("lora") or {})


def loftq_problem(name: str, meta: dict, use: str) -> list[str]:
    """A LoftQ adapter belongs to the 4-bit base; `use` (a merge, vLLM) would put it on the full-precision one."""
    if ((meta.get("config") or {}).get("lora") or {}).get("init") != "loftq":
        return []
    return [f"adapter '{name}' was initialized with LoftQ: its A and B start at the 4-bit base's quantization error "
            f"(s·B@A close to W − Q(W)), so on the full-precision base {use} uses it would count that error twice; "
            "use it on the 4-bit base (`loraplex serve` or `evaluate` with model.quantization: 4bit), or train it with "
            f"datasets.{name}.lora.init=default"]


def variant_name(lora: dict) -> str:
    """One line naming an adapter's variant from its `lora:` block, e.g. 'PiSSA + LoRA+ (B lr ×16)'."""
    parts = [INIT_NAMES.get(lora.get("init") or "default", str(lora.get("init")))]
    if lora.get("use_dora"):
        parts[0] = "DoRA" if parts[0] == "LoRA" else f"{parts[0]} + DoRA"
    if lora.get("use_rslora"):
        parts.append("rsLoRA")
    if lora.get("loraplus_lr_ratio"):
        parts.append(f"LoRA+ (B lr ×{lora['loraplus_lr_ratio']:g})")
    if lora.get("rank_pattern") or lora.get("alpha_pattern"):
        parts.append("per-module r/alpha")
    if parts[0] == "LoRA" and len(parts) > 1:  # "LoRA+ (B lr ×16)", not "LoRA + LoRA+ (B lr ×16)"
        parts = parts[1:]
    return " + ".join(parts)
