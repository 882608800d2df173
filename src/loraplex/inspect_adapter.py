"""`loraplex inspect`: what an adapter holds, and how large its change to each base weight is.

The merge formula is W' = W + scaling·B@A with scaling = lora_alpha / r (lora_alpha / √r with rsLoRA);
a naive W + B@A is off by exactly that factor, so every number here states the scaling it used.
A and B are read straight from adapter_model.safetensors (A: [r, in], B: [out, r]); W comes from a fresh
load of the base model the adapter records, in the dtype it was trained in.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import ModelError, ParameterError, unknown_name_message
from .lora_settings import adapter_variant
from .models import BaseModelRef, base_fingerprint, load_model, resolve_base
from .run import adapter_metadata, base_problem, trained_dtype

PEFT_PREFIX = "base_model.model."
LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
CORNER = 4  # rows and columns of each tensor's top-left corner shown for a `layer` or `module`
LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass
class LoraModule:
    """One adapted linear layer as PEFT stores it: A [r, in], B [out, r], its scaling, DoRA's magnitude."""

    name: str  # the module's name in the base model, e.g. model.layers.0.self_attn.q_proj
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA: one value per output row
    fan_in_fan_out: bool = False  # GPT-2 style Conv1D weights are stored [in, out]

    @property
    def layer(self) -> int | None:
        found = LAYER_INDEX.search(f".{self.name}.")
        return int(found.group(1)) if found else None

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = scaling·B@A, shaped like the base weight (plain LoRA)."""
        delta = self.scaling * (self.B.to(dtype) @ self.A.to(dtype))
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W' for this module alone: W + ΔW, or with DoRA m·(W + ΔW)/‖W + ΔW‖ (norm of each output row)."""
        W = weight.to(dtype)
        delta = self.delta(dtype).to(W.device)
        if self.magnitude is None:
            return W + delta
        V = (W + delta).T if self.fan_in_fan_out else W + delta
        V = (self.magnitude.to(dtype).to(W.device) / torch.linalg.norm(V, dim=1))[:, None] * V
        return V.T if self.fan_in_fan_out else V


@dataclass
class AdapterWeights:
    """An adapter folder read from disk: PEFT config, loraplex metadata and its LoRA modules."""

    adapter_dir: Path
    config: dict  # adapter_config.json
    meta: dict  # loraplex.json ({} for an adapter loraplex did not train)
    modules: dict[str, LoraModule]
    extra_keys: list[str]  # tensors other than A, B, magnitude: trained biases, modules_to_save, embeddings
    num_params: int

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.adapter_dir.name

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def target_modules(self) -> str | list[str]:
        """As configured: a regex string, or the names (PEFT saves a set, in no fixed order: sorted here)."""
        targets = self.config.get("target_modules")
        return targets if isinstance(targets, str) else sorted(targets or [])

    def base_ref(self) -> BaseModelRef:
        return resolve_base(self.meta.get("base_model_location") or "default")

    @property
    def scaling(self) -> float:
        """The config's scaling (a module named in alpha_pattern/rank_pattern has its own)."""
        return lora_scaling(self.config, "", self.config["r"])

    def scaling_formula(self) -> str:
        r, alpha = self.config["r"], self.config["lora_alpha"]
        root = "√" if self.config.get("use_rslora") else ""
        return f"lora_alpha/{root}r = {alpha:g}/{root}{r} = {self.scaling:.6g}"


def lora_scaling(config: dict, module_name: str, r: int) -> float:
    """scaling = alpha/r (alpha/√r with rsLoRA); alpha from alpha_pattern where it names the module."""
    alpha = config["lora_alpha"]
    pattern = config.get("alpha_pattern") or {}
    if pattern and module_name:
        from peft.utils.other import get_pattern_key

        alpha = pattern.get(get_pattern_key(pattern.keys(), module_name), alpha)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_adapter(adapter_dir: str | Path) -> AdapterWeights:
    """Read a PEFT LoRA adapter folder; module names are those of the base model (PEFT prefix removed)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not (config_path.is_file() and weights_path.is_file()):
        raise ModelError(f"{adapter_dir} is not an adapter folder (it needs adapter_config.json and "
                         "adapter_model.safetensors); adapters are in runs/<run>/adapters/<name>/")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{adapter_dir} holds a {config.get('peft_type')} adapter; loraplex reads LoRA adapters")
    tensors = load_file(weights_path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: list[str] = []
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        part = next((p for p in LORA_PARTS if name.endswith("." + p)), None)
        if part is None:
            extra.append(key)
        else:
            parts.setdefault(name[: -len(part) - 1], {})[part] = tensor
    modules = {}
    for name, found in parts.items():
        A, B = found["lora_A.weight"], found["lora_B.weight"]
        modules[name] = LoraModule(name, A, B, lora_scaling(config, name, A.shape[0]),
                                   found.get("lora_magnitude_vector"), bool(config.get("fan_in_fan_out")))
    ordered = dict(sorted(modules.items(), key=lambda item: (item[1].layer or 0, item[0])))
    return AdapterWeights(adapter_dir, config, adapter_metadata(adapter_dir), ordered, extra,
                          sum(t.numel() for t in tensors.values()))


def select_modules(adapter: AdapterWeights, layer: int | None, module: str | None) -> list[LoraModule]:
    selected = list(adapter.modules.values())
    if module is not None:
        leaves = list(dict.fromkeys(m.leaf for m in selected))
        if module not in leaves:
            raise ParameterError("module", f"{unknown_name_message('module', module, leaves)} (in this adapter)")
        selected = [m for m in selected if m.leaf == module]
    if layer is not None:
        layers = sorted({m.layer for m in selected if m.layer is not None})
        if layer not in layers:
            raise ParameterError("layer", f"the adapter has no {module or 'module'} in layer {layer}; "
                                 f"its layers: {', '.join(map(str, layers)) or '(none)'}")
        selected = [m for m in selected if m.layer == layer]
    return selected


@dataclass
class AdapterInspection:
    """What `loraplex.inspect` reads from an adapter's files (`to_dict()`: what `loraplex inspect --json` prints)."""

    adapter_dir: str
    name: str
    base_model: str
    base_model_location: str
    base_fingerprint_warning: str | None  # the base now differs from the one it trained on (None: the same)
    target_modules: list[str] | str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    variant: dict | None
    scaling: float  # lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA)
    scaling_formula: str
    merge_formula: str
    trainable_params: int
    other_tensors: list[str]  # tensors besides LoRA A/B (modules_to_save, DoRA magnitudes)
    modules: list[dict]  # per layer × module: shapes and norms of A, B, ΔW and W (`module_stats`)
    values: dict | None = None  # one module picked: the top-left corner of W, A, B, ΔW, W + ΔW (`module_values`)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.values is None:
            data.pop("values")
        return data


def inspect_adapter(adapter_dir: str | Path, layer: int | None = None, module: str | None = None) -> AdapterInspection:
    """Config, scaling, parameter count and per layer × module norms; values too when one module is picked."""
    adapter = read_adapter(adapter_dir)
    selected = select_modules(adapter, layer, module)
    base = adapter.base_ref()
    dtype = trained_dtype(adapter.meta)
    model = load_model(base, dtype)
    warning = base_problem(adapter.name, adapter.adapter_dir, adapter.meta, base, base_fingerprint(model, dtype))
    weights = {m.name: _base_weight(model, m.name) for m in selected}
    cfg = adapter.config
    one = (layer is not None or module is not None) and len(selected) == 1
    return AdapterInspection(
        adapter_dir=str(adapter.adapter_dir), name=adapter.name,
        base_model=adapter.meta.get("base_model", base.name), base_model_location=base.location,
        base_fingerprint_warning=warning,
        target_modules=adapter.target_modules, r=cfg["r"], lora_alpha=cfg["lora_alpha"],
        use_rslora=bool(cfg.get("use_rslora")), use_dora=adapter.use_dora, variant=adapter_variant(adapter.meta),
        scaling=adapter.scaling, scaling_formula=adapter.scaling_formula(), merge_formula=_merge_formula(adapter),
        trainable_params=adapter.num_params, other_tensors=adapter.extra_keys,
        modules=[module_stats(m, weights[m.name]) for m in selected],
        values=module_values(selected[0], weights[selected[0].name]) if one else None)


def _base_weight(model, name: str) -> torch.Tensor:
    try:
        return model.get_submodule(name).weight.detach().float()
    except AttributeError:
        raise ModelError(f"the adapter adapts '{name}', which the base model {type(model).__name__} does not have; "
                         "was it trained on another architecture?") from None


def _merge_formula(adapter: AdapterWeights) -> str:
    if adapter.use_dora:
        return ("DoRA: W' = m·(W + s·B@A)/‖W + s·B@A‖ (row-wise), s = " + adapter.scaling_formula()
                + "; ΔW below is the effective change W' − W")
    return f"W' = W + s·B@A with s = {adapter.scaling_formula()} (not W + B@A)"


def module_stats(module: LoraModule, weight: torch.Tensor) -> dict:
    """Shapes and Frobenius norms of A, B, ΔW and W, and ‖ΔW‖/‖W‖, for one module."""
    delta = module.merged_weight(weight) - weight if module.magnitude is not None else module.delta()
    w_norm, d_norm = float(torch.linalg.norm(weight)), float(torch.linalg.norm(delta))
    return {"name": module.name, "layer": module.layer, "module": module.leaf,
            "A_shape": list(module.A.shape), "B_shape": list(module.B.shape), "scaling": module.scaling,
            "A_norm": float(torch.linalg.norm(module.A.float())), "B_norm": float(torch.linalg.norm(module.B.float())),
            "delta_norm": d_norm, "W_norm": w_norm, "relative_delta_norm": d_norm / w_norm if w_norm else float("nan")}


def module_values(module: LoraModule, weight: torch.Tensor) -> dict:
    """The top-left corner of W, A, B, B@A, ΔW = scaling·B@A and W + ΔW."""
    merged = module.merged_weight(weight)
    corner = slice(0, CORNER)

    def head(t: torch.Tensor) -> list[list[float]]:
        return t.float()[corner, corner].tolist()

    return {"name": module.name, "scaling": module.scaling, "dora": module.magnitude is not None, "corner": CORNER,
            "W": head(weight), "A": head(module.A), "B": head(module.B),
            "BA": head(module.B.float() @ module.A.float()), "delta": head(merged - weight), "merged": head(merged)}
