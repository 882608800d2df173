"""One adapter's LoRA variant while it trains: PEFT's init methods and LoRA+, on a base that stays pristine.

PiSSA, OLoRA and CorDA replace each adapted base weight W by W_res = W - s·B0@A0 at init (s: the scaling), so
that W_res + s·B0@A0 = W. `Variant.inject` first copies the weights they will touch (those alone: the adapted
modules' weights, into CPU memory) and saves the initial A0, B0. The trained adapter is saved through PEFT's
conversion (`path_initial_model_for_weight_conversion`): W_res + s·B@A = W + s·(B@A - B0@A0)
= W + s·[B | -B0]@[A ; A0], a plain LoRA of rank 2r (lora_alpha 2·alpha keeps s) against the untouched W.
`restore`, right after the adapter is unloaded, puts the copies back: the reload check, the next adapter and
the isolation check all see the pristine base.

EVA sets A from the SVD of each adapted layer's inputs on the dataset's training rows (B = 0, the base
untouched; PEFT may move rank between layers, saved as rank_pattern). CorDA weights the base weight's
components by those inputs' covariance. LoftQ (4-bit base) sets A and B so that Q(W) + s·B@A is close to W,
from the full-precision weights in the base's safetensors; the quantized base is not changed. LoRA+ trains
every B at train.lr × loraplus_lr_ratio (PEFT's create_loraplus_optimizer).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..lm.packed import PaddedCollator
from ..lora_settings import BASE_REWRITING, variant_name
from ..models import BaseModelRef
from ..recipe import DatasetSpec
from .distributed import is_main, wait_for_everyone

INITIAL_ADAPTER = "initial_adapter"  # A0, B0 of a base-rewriting init, in the adapter's checkpoints folder
CALIBRATION_ROWS = 128  # training rows EVA and CorDA read, at most (PEFT suggests ~hidden/tokens·128 for CorDA)


def loraplus_optimizer(peft_model, spec: DatasetSpec, args) -> torch.optim.Optimizer | None:
    """LoRA+: the Trainer's own optimizer class and settings, B's parameter groups at lr × loraplus_lr_ratio."""
    ratio = spec.lora.loraplus_lr_ratio
    if ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, peft_model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(peft_model, optimizer_cls, lr=args.learning_rate, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=args.weight_decay, **kwargs)


@dataclass
class _Kept:
    """A base weight a base-rewriting init replaces: the parameter, its original storage and a copy of it."""

    module: torch.nn.Module
    param: torch.nn.Parameter
    storage: torch.Tensor
    copy: torch.Tensor  # on the CPU


@dataclass
class Variant:
    """The variant of one adapter: `inject` it, save with `save_options()`, `restore` the base after unloading."""

    spec: DatasetSpec
    train_rows: object  # the dataset's tokenized training rows (EVA, CorDA)
    work_dir: Path  # the adapter's checkpoints folder
    base: BaseModelRef | None = None  # where LoftQ reads the full-precision weights
    kept: list[_Kept] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)  # seconds, and MB copied

    @property
    def init(self) -> str:
        return self.spec.lora.init

    @property
    def initial_dir(self) -> Path:
        return self.work_dir / INITIAL_ADAPTER

    def inject(self, model, config):
        """get_peft_model with the variant's init; the base's touched weights copied first where it rewrites them."""
        from peft import get_peft_model

        started = time.perf_counter()
        if self.init in BASE_REWRITING:
            self._keep_touched(model, config)
            self.cost["copy_s"] = time.perf_counter() - started
        if self.init == "corda":
            self._corda_covariance(model, config)
        peft_model = get_peft_model(model, config)
        if self.init == "eva":
            self._eva(peft_model)
        elif self.init == "loftq":
            self._loftq(peft_model)
        if self.init in BASE_REWRITING:
            self._save_initial(peft_model)
        self.cost["init_s"] = time.perf_counter() - started
        return peft_model

    def save_options(self) -> dict:
        """save_pretrained's arguments: a base-rewriting init is saved as the plain LoRA it amounts to."""
        return {"path_initial_model_for_weight_conversion": str(self.initial_dir)} if self.kept else {}

    def restore(self) -> None:
        """Put back every base weight the init replaced (after the adapter is unloaded)."""
        started = time.perf_counter()
        with torch.no_grad():
            for kept in self.kept:
                kept.module.weight = kept.param  # a re-quantizing init swaps the parameter itself
                kept.param.data = kept.storage  # the others swap its storage (or write into it: OLoRA in float32)
                kept.storage.copy_(kept.copy)
        if self.kept:
            self.cost["restore_s"] = time.perf_counter() - started
        self.kept = []

    def record(self) -> dict:
        """What loraplex.json says about the variant."""
        lora = self.spec.lora.model_dump(mode="json")
        out = {"name": variant_name(lora), "init": self.init, "loraplus_lr_ratio": self.spec.lora.loraplus_lr_ratio,
               "cost": {k: round(v, 4) for k, v in self.cost.items()}}
        if self.init in BASE_REWRITING:
            out["saved_as"] = ("plain LoRA of rank 2r against the untouched base: ΔW = s·(B@A − B0@A0) "
                               "(PEFT's path_initial_model_for_weight_conversion)")
        return out

    def _keep_touched(self, model, config) -> None:
        from peft.tuners.lora import LoraModel

        copied = 0
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and LoraModel._check_target_module_exists(config, name):
                copy = weight.detach().to("cpu", copy=True)
                self.kept.append(_Kept(module, weight, weight.data, copy))
                copied += copy.numel() * copy.element_size()
        self.cost["copied_mb"] = copied / 2**20

    def _calibration_rows(self) -> list[dict]:
        return [self.train_rows[i] for i in range(min(len(self.train_rows), CALIBRATION_ROWS))]

    def _corda_covariance(self, model, config) -> None:
        from peft.tuners.lora.corda import preprocess_corda

        device = next(model.parameters()).device
        rows = self._calibration_rows()

        @torch.no_grad()
        def run_model() -> None:  # one sequence per pass: PEFT's hook takes each input as [tokens, features]
            for row in rows:
                model(input_ids=torch.tensor([row["input_ids"]], device=device))

        preprocess_corda(model, config, run_model=run_model)

    def _eva(self, peft_model) -> None:
        from peft import initialize_lora_eva_weights

        collate, size = PaddedCollator(peft_model.config.pad_token_id or 0), self.spec.train.batch_size
        rows = self._calibration_rows()
        batches = [collate(rows[i:i + size]) for i in range(0, len(rows), size)]  # answer tokens only (labels)
        # every process has all the rows: no gathering, the same A everywhere
        initialize_lora_eva_weights(peft_model, batches, gather_distributed_inputs=False, show_progress_bar=False)
        # EVA re-creates the layers whose rank it redistributes in the base's dtype, while PEFT keeps the others (and
        # every layer of the saved adapter once loaded) in float32: cast them alike, or a bfloat16 base trains those
        # layers in bfloat16 and the saved adapter does not reproduce the trained model
        from peft.tuners.tuners_utils import cast_adapter_dtype

        cast_adapter_dtype(peft_model, adapter_name=peft_model.active_adapter, autocast_adapter_dtype=True)

    @torch.no_grad()
    def _loftq(self, peft_model) -> None:
        """PEFT's replace_lora_weights_loftq step on any device (PEFT's runs on CUDA/XPU only), with the scaling
        taken out: s·B@A is the best rank-r approximation of W − Q(W), W read from the base's safetensors."""
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit
        from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

        location = self.base.location if self.base is not None and self.base.is_local else None
        weights = _SafetensorLoader(peft_model, location)
        for name, module in peft_model.named_modules():
            if not isinstance(module, Linear4bit) or "default" not in module.lora_A:
                continue
            quantized = module.get_base_layer().weight  # packed 4-bit codes [n, 1] and their quant_state
            W = weights.get_tensor(name.removeprefix("base_model.model.") + ".weight").to(quantized.device).float()
            residual = W - bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state).float()
            low_rank = _low_rank_decomposition(residual, reduced_rank=module.r["default"])  # L [out, r], R [r, in]
            root = module.scaling["default"] ** 0.5
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            A.data = (low_rank["R"] / root).to(A.dtype)
            B.data = (low_rank["L"] / root).to(B.dtype)

    def _save_initial(self, peft_model) -> None:
        """A0, B0, saved as PEFT's conversion reads them (a config saying init_lora_weights=True)."""
        config = peft_model.peft_config["default"]
        if is_main():
            config.init_lora_weights = True
            try:
                peft_model.save_pretrained(str(self.initial_dir), selected_adapters=["default"])
            finally:
                config.init_lora_weights = self.init
        wait_for_everyone()
