"""`loraplex merge`: adapters of a run merged into their base, written as a standalone model, verified.

W' = W + Σᵢ wᵢ·scalingᵢ·Bᵢ@Aᵢ, scaling = lora_alpha/r (lora_alpha/√r with rsLoRA), computed in float32 on
a fresh full-precision load of the pristine base (the cached base folder is only read). Adapters trained on a
4-bit base (QLoRA) merge here too, never into quantized weights, and the report says so. Adapters on
disjoint modules add exactly; on a shared module the weighted sum is still exact (it is what PEFT's `cat`
computes), while PEFT's `linear`/`ties`/`dare_linear` combine the A's and the B's separately (cross terms
Bᵢ@Aⱼ, pruning) and are not. DoRA adapters go through PEFT's `merge_and_unload`
(W' = m·(W + ΔW)/‖W + ΔW‖ per row), and only on modules no other adapter touches, since DoRA's row norms
do not add.

Every merge is verified and the numbers saved in `merge_report.json`: the saved weights against the
formula, the saved model's logits against base+adapters (PEFT, all adapters active at once), and per
adapter how much of its held-out loss improvement the merged model keeps.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .atomic import _umask, atomic_dir, atomic_write_json
from .errors import LoraplexError
from .evaluate import heldout_metrics
from .inspect_adapter import AdapterWeights, read_adapter
from .models import BaseModelRef, base_state_items, load_model, pick_dtype
from .run import check_base
from .recipe import unknown_name_message

METHODS = ("auto", "sum", "cat", "linear", "ties", "dare_linear")
PEFT_METHODS = ("linear", "ties", "dare_linear")
DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_RTOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}  # of max(max|W|, max|expected W'|)
LOGIT_RTOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}  # max|Δlogits| / max(1, max|logits|)
KEEP_THRESHOLD = 0.9  # share of an adapter's held-out loss improvement the merged model should keep
COMBINED = "loraplex_combined"  # name of PEFT's combined adapter for linear/ties/dare_linear
REPORT_NAME = "merge_report.json"
PROBE_TEXTS = ("Hello! Who are you?", "What is 17 + 25?", "用一句话介绍长城。", "「ありがとう」を英語に訳してください。",
               "Write one sentence about rivers.")


@dataclass
class MergePlan:
    """What to merge, validated before any model is loaded."""

    run_dir: Path
    adapters: dict[str, AdapterWeights]
    weights: dict[str, float]
    method: str  # "sum" or one of PEFT_METHODS
    requested: str
    dtype: str
    base: BaseModelRef
    owners: dict[str, list[str]] = field(default_factory=dict)  # module name -> adapters adapting it
    density: float = 1.0  # ties/dare_linear: share of values kept
    note: str = ""  # how exact the method is here

    @property
    def prunes(self) -> bool:
        """ties/dare_linear prune each module's A and B (PEFT falls back to linear for a single adapter)."""
        return self.method in ("ties", "dare_linear") and len(self.adapters) > 1 and self.density < 1

    @property
    def exact(self) -> bool:
        return self.method == "sum" or not (self.shared_modules() or self.prunes)

    def shared_modules(self) -> list[str]:
        return [name for name, owners in self.owners.items() if len(owners) > 1]

    def dora_owner(self, module: str) -> str | None:
        owner = self.owners[module][0]
        return owner if self.adapters[owner].use_dora else None


def merge(run_dir: str | Path, adapters: str | list[str], weights: str | list[float] | None = None,
          method: str = "auto", *, out_dir: str | Path, dtype: str = "float32", density: float = 0.5, seed: int = 0,
          overwrite: bool = False, echo: Callable[[str], None] | None = None) -> dict:
    """Merge `adapters` (names in RUN/adapters) into the base; write `out_dir`, verify, return the report.

    `echo` receives the interference report and the method's exactness before the merge starts.
    """
    echo = echo or (lambda line: None)
    plan = plan_merge(run_dir, adapters, weights, method, dtype, density)
    out_dir = _claim_out_dir(Path(out_dir), plan, overwrite)
    pairs = interference(plan)
    precision = precision_note(plan)
    for line in interference_lines(plan, pairs) + [plan.note] + ([precision] if precision else []):
        echo(line)
    reference = reference_model(plan, seed)
    tokenizer, template, template_note = _tokenizer(plan)
    with atomic_dir(out_dir) as tmp:
        _write_merged(plan, reference, tokenizer, tmp)
        merged = load_model(BaseModelRef(str(tmp), out_dir.name), torch.float32, device=_device())
        report = _verify(plan, reference, merged, _probe_ids(tokenizer, template), tmp)
        report.update(method_note=plan.note, interference=pairs, notes=[template_note] if template_note else [],
                      out_dir=str(out_dir), base_precision="full", precision_note=precision,
                      trained_on_quantized_base=_quantized(plan))
        report["heldout"] = heldout_report(plan, reference, merged)
        atomic_write_json(tmp / REPORT_NAME, report)
    return report


# --------------------------------------------------------------------------- plan


def plan_merge(run_dir: str | Path, adapters: str | list[str], weights: str | list[float] | None,
               method: str, dtype: str, density: float = 0.5) -> MergePlan:
    """Read and check the adapters, weights and method (the adapters' problems all at once)."""
    run_dir = Path(run_dir)
    names = _as_list(adapters)
    if not names:
        raise LoraplexError("--adapters: name at least one adapter of the run, e.g. --adapters zh,en")
    if len(set(names)) != len(names):
        raise LoraplexError(f"--adapters: an adapter is named twice in {', '.join(names)}")
    if method not in METHODS:
        raise LoraplexError(f"--method: {unknown_name_message('method', method, list(METHODS))}")
    if dtype not in DTYPES:
        raise LoraplexError(f"--dtype: {unknown_name_message('dtype', dtype, list(DTYPES))}")
    if method in ("ties", "dare_linear") and not 0 < density <= 1:
        raise LoraplexError(f"--density: {density:g} is not a share of values to keep; use 0 < density <= 1")
    loaded = {name: read_adapter(_adapter_dir(run_dir, name)) for name in names}
    plan = MergePlan(run_dir, loaded, _weights(weights, names), "sum" if method in ("auto", "sum", "cat") else method,
                     method, dtype, next(iter(loaded.values())).base_ref(), density=density)
    for name, adapter in loaded.items():
        for module in adapter.modules:
            plan.owners.setdefault(module, []).append(name)
    problems = _problems(plan)
    if problems:
        raise LoraplexError(problems, title="these adapters cannot be merged")
    plan.note = _method_note(plan)
    return plan


def _as_list(value: str | list | None) -> list:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() if isinstance(item, str) else item for item in items if item != ""]


def _weights(weights: str | list[float] | None, names: list[str]) -> dict[str, float]:
    values = _as_list(weights) or [1.0] * len(names)
    if len(values) != len(names):
        raise LoraplexError(f"--weights: {len(values)} weights for {len(names)} adapters ({', '.join(names)}); "
                            "give one weight per adapter, in the same order")
    try:
        return {name: float(v) for name, v in zip(names, values)}
    except ValueError:
        raise LoraplexError(f"--weights: {weights!r} is not a list of numbers, e.g. --weights 1,0.5") from None


def _adapter_dir(run_dir: Path, name: str) -> Path:
    adapter_dir = run_dir / "adapters" / name
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        known = sorted(p.name for p in (run_dir / "adapters").glob("*") if (p / "adapter_model.safetensors").is_file())
        if not known:
            raise LoraplexError(f"{run_dir} holds no trained adapter (no {run_dir}/adapters/<name>/); "
                                "pass the run folder, e.g. runs/<recipe>")
        raise LoraplexError(f"--adapters: {unknown_name_message('adapter', name, known)} (in {run_dir}/adapters)")
    return adapter_dir


def _problems(plan: MergePlan) -> list[str]:
    problems = []
    for name, adapter in plan.adapters.items():
        if adapter.extra_keys:
            problems.append(f"adapter '{name}' holds tensors other than LoRA A/B ({adapter.extra_keys[0]}, ...: "
                            "trained biases, modules_to_save or embeddings); merging those is not supported")
        if adapter.use_dora and plan.method != "sum":
            problems.append(f"adapter '{name}' is a DoRA adapter, which PEFT's {plan.method} cannot combine; "
                            "use --method sum")
        if adapter.use_dora and plan.weights[name] != 1.0:
            problems.append(f"adapter '{name}' is a DoRA adapter: it merges at weight 1 only "
                            f"(got {plan.weights[name]:g})")
    for module in plan.shared_modules():
        dora = [n for n in plan.owners[module] if plan.adapters[n].use_dora]
        if dora:
            problems.append(f"DoRA adapter '{dora[0]}' shares {module} with "
                            f"{', '.join(repr(n) for n in plan.owners[module] if n != dora[0])}: DoRA rescales each "
                            "weight row by its norm, so the changes do not add; merge them separately")
            break
    return problems


def _quantized(plan: MergePlan) -> dict[str, str]:
    """adapter -> how its base was quantized while it trained (QLoRA adapters only)."""
    return {name: a.meta["quantization"] for name, a in plan.adapters.items() if a.meta.get("quantization")}


def precision_note(plan: MergePlan) -> str | None:
    """Adapters trained on a 4/8-bit base merge into the full-precision weights, never into quantized ones."""
    quantized = _quantized(plan)
    if not quantized:
        return None
    kinds = "; ".join(sorted(set(quantized.values())))
    return (f"{', '.join(quantized)} trained on a quantized base ({kinds}): merged onto the full-precision base "
            f"weights ({plan.base.location}, computed in float32, saved as {plan.dtype}), not into quantized weights")


def _method_note(plan: MergePlan) -> str:
    if plan.method in PEFT_METHODS and not plan.exact:
        why = ["it combines the A's and the B's separately, so cross terms Bᵢ@Aⱼ appear"] if plan.shared_modules() else []
        why += [f"it prunes values (density {plan.density:g})"] if plan.prunes else []
        return (f"method {plan.method} (PEFT add_weighted_adapter): NOT an exact sum: {'; '.join(why)}; "
                "the checks compare against PEFT's combined adapter")
    peft = f"method {plan.method} (PEFT add_weighted_adapter) is exact here: " if plan.method in PEFT_METHODS else ""
    if plan.shared_modules():
        cat = " (PEFT's cat concatenates A and B, which is this same sum)" if plan.requested == "cat" else ""
        return f"method {plan.requested}: W' = W + Σ wᵢ·scalingᵢ·Bᵢ@Aᵢ in float32, exact on shared modules too{cat}"
    text = (f"disjoint target modules: the {len(plan.adapters)} adapters add exactly" if len(plan.adapters) > 1
            else "one adapter: exact") + ", each module gets W' = W + w·scaling·B@A"
    if any(a.use_dora for a in plan.adapters.values()):
        text += " (DoRA modules: m·(W + ΔW)/‖W + ΔW‖, merged by PEFT)"
    return peft + text


def _claim_out_dir(out_dir: Path, plan: MergePlan, overwrite: bool) -> Path:
    """Refuse to replace a folder that is not a previous merge, or a previous merge without --overwrite."""
    out_dir = out_dir.expanduser().resolve()
    base, run = Path(plan.base.location).resolve(), plan.run_dir.resolve()
    if out_dir.is_relative_to(base) or any(p.is_relative_to(out_dir) for p in (base, run) if p.exists()):
        raise LoraplexError(f"--out {out_dir} would replace or write into the base model, or replace the run; "
                            "choose a new folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / REPORT_NAME).is_file():
            raise LoraplexError(f"--out {out_dir} exists and is not a merged model; choose a new folder")
        if not overwrite:
            raise LoraplexError(f"--out {out_dir} holds a previous merge; pass --overwrite to replace it")
    return out_dir


# --------------------------------------------------------------------------- interference


def interference(plan: MergePlan) -> list[dict]:
    """For each pair of adapters: the modules they share and the cosine similarity of their deltas there."""
    pairs = []
    for a, b in itertools.combinations(plan.adapters, 2):
        left, right = plan.adapters[a].modules, plan.adapters[b].modules
        shared = [name for name in left if name in right]
        cosine = {name: _cosine(plan.weights[a] * left[name].delta(), plan.weights[b] * right[name].delta())
                  for name in shared}
        pairs.append({"adapters": [a, b], "shared_modules": shared, "cosine": cosine})
    return pairs


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    denominator = float(torch.linalg.norm(x) * torch.linalg.norm(y))
    return float((x * y).sum()) / denominator if denominator else 0.0


def interference_lines(plan: MergePlan, pairs: list[dict]) -> list[str]:
    lines = []
    for pair in pairs:
        a, b = pair["adapters"]
        if not pair["shared_modules"]:
            lines.append(f"{a} × {b}: no shared module ({a}: {_leaves(plan, a)}; {b}: {_leaves(plan, b)})")
            continue
        by_leaf: dict[str, list[float]] = {}
        for name, cos in pair["cosine"].items():
            by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(cos)
        parts = [f"{leaf} ×{len(c)}: cos mean {sum(c) / len(c):+.3f} [{min(c):+.3f}, {max(c):+.3f}]"
                 for leaf, c in by_leaf.items()]
        lines.append(f"{a} × {b}: share {len(pair['shared_modules'])} modules; cosine of their deltas: "
                     + "; ".join(parts))
    return lines


def _leaves(plan: MergePlan, name: str) -> str:
    return ", ".join(dict.fromkeys(m.leaf for m in plan.adapters[name].modules.values()))


# --------------------------------------------------------------------------- models


def _device() -> str | None:
    return "cuda" if torch.cuda.is_available() else None


def reference_model(plan: MergePlan, seed: int = 0):
    """A fresh float32 base (fingerprint checked) with every adapter loaded side by side by PEFT."""
    from peft import PeftModel

    model = load_model(plan.base, torch.float32)
    check_base(model, plan.base, {name: a.adapter_dir for name, a in plan.adapters.items()})  # in their dtypes
    peft_model = None
    for name, adapter in plan.adapters.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(adapter.adapter_dir), adapter_name=name)
        else:
            peft_model.load_adapter(str(adapter.adapter_dir), adapter_name=name)
    if plan.method in PEFT_METHODS:
        _add_combined(peft_model, plan, seed)
    if _device():
        peft_model.to(_device())
    return peft_model.eval()


def _add_combined(peft_model, plan: MergePlan, seed: int) -> None:
    names = list(plan.adapters)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dare_linear drops values at random
        try:
            peft_model.add_weighted_adapter(names, [plan.weights[n] for n in names], COMBINED,
                                            combination_type=plan.method,
                                            density=None if plan.method == "linear" else plan.density)
        except ValueError as exc:
            raise LoraplexError(f"--method {plan.method}: PEFT refused these adapters ({exc}); "
                                "--method sum merges them exactly") from None
    # PEFT gives the combined adapter r = lora_alpha but keeps the first adapter's use_rslora, which would
    # scale it by √r; its A and B already carry each wᵢ·scalingᵢ, so its scaling is 1.
    for layer in _lora_layers(peft_model):
        if COMBINED in layer.scaling:
            layer.scaling[COMBINED] = 1.0


def _lora_layers(peft_model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


def _lora_layer(reference, name: str):
    return reference.get_base_model().get_submodule(name)


def expected_delta(plan: MergePlan, reference, name: str) -> torch.Tensor:
    """What W' − W must be on a plain LoRA module: the exact weighted sum, or PEFT's combined adapter."""
    if plan.method in PEFT_METHODS:
        return _lora_layer(reference, name).get_delta_weight(COMBINED).float()
    return sum(plan.weights[a] * plan.adapters[a].modules[name].delta() for a in plan.owners[name])


def _tokenizer(plan: MergePlan):
    """The base's tokenizer with the chat template the adapters were trained with."""
    from transformers import AutoTokenizer

    from .data.render import chat_template_for

    tokenizer = AutoTokenizer.from_pretrained(plan.base.location)
    names = {a.meta.get("config", {}).get("template") for a in plan.adapters.values()}
    templates = {chat_template_for(tokenizer, n) for n in names}
    note = None
    if len(templates) > 1:
        note = (f"the adapters were trained with different chat templates ({', '.join(sorted(map(str, names)))}); "
                "the merged tokenizer keeps the base's")
        templates = {chat_template_for(tokenizer)}
    tokenizer.chat_template = templates.pop()
    return tokenizer, tokenizer.chat_template, note


def _write_merged(plan: MergePlan, reference, tokenizer, folder: Path) -> None:
    """A second fresh base load gets every change (DoRA through PEFT), then is saved with the tokenizer."""
    model = _merge_dora(load_model(plan.base, torch.float32), plan)
    with torch.no_grad():
        for name in plan.owners:
            if plan.dora_owner(name) is None:
                weight = model.get_submodule(name).weight
                weight += expected_delta(plan, reference, name).to(weight.device)
    model.to(pick_dtype(plan.dtype)).save_pretrained(folder)  # with config.json and generation_config.json
    tokenizer.save_pretrained(folder)
    for path in folder.iterdir():  # safetensors writes 0600; a serving process under another user must read it
        path.chmod(0o666 & ~_umask())


def _merge_dora(model, plan: MergePlan):
    from peft import PeftModel

    dora = [n for n, a in plan.adapters.items() if a.use_dora]
    if not dora:
        return model
    peft_model = PeftModel.from_pretrained(model, str(plan.adapters[dora[0]].adapter_dir), adapter_name=dora[0])
    for name in dora[1:]:
        peft_model.load_adapter(str(plan.adapters[name].adapter_dir), adapter_name=name)
    return peft_model.merge_and_unload(adapter_names=dora)


# --------------------------------------------------------------------------- verification


def _verify(plan: MergePlan, reference, merged, probes: list[torch.Tensor], folder: Path) -> dict:
    weights = check_weights(plan, reference, merged)
    logits = check_logits(plan, reference, merged, probes)
    keys = _saved_keys(folder)
    nested = [k for k in keys if "base_model.model" in k or "lora_" in k]
    failures = []
    failed = [name for name, entry in weights["modules"].items() if not entry["passed"]]
    if failed:
        entry = weights["modules"][failed[0]]
        failures.append(f"weights: {failed[0]} is off by {entry['max_abs_diff']:.3e} ({entry['relative']:.3e} of "
                        f"max|W|; tolerance {weights['tolerance_relative']:g}) and {len(failed) - 1} more modules")
    if weights["untouched_max_abs_diff"] != 0.0 or weights["missing_or_extra"]:
        failures.append(f"weights no adapter touches changed (max {weights['untouched_max_abs_diff']:.3e}) or "
                        f"differ in name ({', '.join(weights['missing_or_extra'][:3])})")
    if logits["max_abs_diff"] > logits["tolerance"]:
        failures.append(f"logits: max |merged − base+adapters| = {logits['max_abs_diff']:.3e} > tolerance "
                        f"{logits['tolerance']:.3e}")
    if nested:
        failures.append(f"saved keys still carry PEFT names, e.g. {nested[0]}")
    if failures:
        raise LoraplexError(failures + ["this is a bug: please report it with these numbers"],
                            title="the merged model failed verification (nothing was written)")
    return {
        "run_dir": str(plan.run_dir), "method": plan.method, "method_requested": plan.requested, "exact": plan.exact,
        "dtype": plan.dtype, "base_model": plan.base.name, "base_model_location": plan.base.location,
        "adapters": [_adapter_entry(name, a, plan.weights[name]) for name, a in plan.adapters.items()],
        "shared_modules": plan.shared_modules(), "verification": {"weights": weights, "logits": logits},
    }


def _adapter_entry(name: str, adapter: AdapterWeights, weight: float) -> dict:
    cfg = adapter.config
    return {"name": name, "adapter_dir": str(adapter.adapter_dir), "weight": weight, "r": cfg["r"],
            "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("use_rslora")), "use_dora": adapter.use_dora,
            "scaling": adapter.scaling, "scaling_formula": adapter.scaling_formula(),
            "target_modules": adapter.target_modules, "modules": len(adapter.modules)}


@torch.no_grad()
def check_weights(plan: MergePlan, reference, merged) -> dict:
    """Per merged module max|W' − expected| (and relative to max|W|); every other weight must be unchanged."""
    modules = {}
    for name, owners in plan.owners.items():
        W = _lora_layer(reference, name).get_base_layer().weight.double()  # pristine: the reference never merges
        exact = W + sum(plan.weights[a] * plan.adapters[a].modules[name].delta(torch.float64).to(W.device)
                        for a in owners)  # recomputed in float64, independently of the merge's float32 sum
        dora = plan.dora_owner(name)
        if dora:
            expected = plan.adapters[dora].modules[name].merged_weight(W, torch.float64)
        elif plan.method in PEFT_METHODS:
            expected = W + expected_delta(plan, reference, name).double()
        else:
            expected = exact
        got = merged.get_submodule(name).weight.double()
        scale = float(W.abs().max()) or 1.0
        entry = {"adapters": owners, "max_abs_diff": float((got - expected).abs().max()), "max_abs_W": scale,
                 "max_abs_expected": float(expected.abs().max())}
        entry["relative"] = entry["max_abs_diff"] / scale
        # a saved bfloat16/float16 weight is rounded relative to its own size, which ΔW may have grown
        entry["passed"] = entry["max_abs_diff"] <= WEIGHT_RTOL[plan.dtype] * max(scale, entry["max_abs_expected"])
        if plan.method in PEFT_METHODS:
            entry["exact_sum_relative_deviation"] = float((got - exact).abs().max()) / scale
        modules[name] = entry
    untouched, odd = _untouched(plan, reference, merged)
    return {"reference": _weights_reference(plan), "tolerance_relative": WEIGHT_RTOL[plan.dtype],
            "max_abs_diff": max(e["max_abs_diff"] for e in modules.values()),
            "max_relative": max(e["relative"] for e in modules.values()),
            "untouched_max_abs_diff": untouched, "missing_or_extra": odd, "modules": modules}


def _weights_reference(plan: MergePlan) -> str:
    if plan.method in PEFT_METHODS:
        return f"W + PEFT's {plan.method} combined adapter (not the exact sum; see exact_sum_relative_deviation)"
    dora = " (DoRA modules: m·(W + ΔW)/‖W + ΔW‖)" if any(a.use_dora for a in plan.adapters.values()) else ""
    return "W + Σ wᵢ·scalingᵢ·Bᵢ@Aᵢ computed from adapter_model.safetensors" + dora


def _untouched(plan: MergePlan, reference, merged) -> tuple[float, list[str]]:
    touched = {f"{name}.weight" for name in plan.owners}
    pristine = dict(base_state_items(reference))
    saved = merged.state_dict()
    odd = sorted(set(pristine) ^ set(saved))
    worst = 0.0
    for name, tensor in saved.items():
        if name in touched or name not in pristine or not tensor.numel():
            continue
        expected = pristine[name].to(pick_dtype(plan.dtype)).float()  # the saved dtype's rounding, nothing more
        worst = max(worst, float((tensor.float() - expected.to(tensor.device)).abs().max()))
    return worst, odd


def _saved_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            keys += list(fh.keys())
    return keys


@contextlib.contextmanager
def all_adapters_active(reference, plan: MergePlan):
    """Base+adapters as the merge promises it: every adapter active at its weight, or PEFT's combined one."""
    names = [COMBINED] if plan.method in PEFT_METHODS else list(plan.adapters)
    reference.base_model.set_adapter(names if len(names) > 1 else names[0], inference_mode=True)
    layers = _lora_layers(reference)
    try:
        for layer in layers:
            for name in names:
                if name != COMBINED:
                    layer.set_scale(name, plan.weights[name])
        yield reference
    finally:
        for layer in layers:
            for name in names:
                if name != COMBINED:
                    layer.set_scale(name, 1.0)


@torch.no_grad()
def check_logits(plan: MergePlan, reference, merged, probes: list[torch.Tensor]) -> dict:
    """Max |logits(merged) − logits(base+adapters)| over a few short chat prompts."""
    device = next(merged.parameters()).device
    with all_adapters_active(reference, plan):
        expected = [reference(input_ids=ids.to(device)).logits.float() for ids in probes]
    got = [merged(input_ids=ids.to(device)).logits.float() for ids in probes]
    diff = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    scale = max(1.0, max(float(e.abs().max()) for e in expected))
    reference_name = (f"PEFT's {plan.method} combined adapter (not the exact sum)" if plan.method in PEFT_METHODS
                      else "PEFT base+adapters, all active at once, each at its weight")
    return {"reference": reference_name, "prompts": len(probes), "tokens": sum(ids.numel() for ids in probes),
            "max_abs_diff": diff, "max_abs_logit": scale, "tolerance": LOGIT_RTOL[plan.dtype] * scale}


def _probe_ids(tokenizer, template: str) -> list[torch.Tensor]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], chat_template=template, tokenize=False,
                                           add_generation_prompt=True) for t in PROBE_TEXTS]
    return [tokenizer(t, add_special_tokens=False, return_tensors="pt").input_ids for t in texts]


# --------------------------------------------------------------------------- held-out loss


@torch.no_grad()
def heldout_report(plan: MergePlan, reference, merged) -> dict:
    """Held-out loss of base, adapter and merged model on each adapter's own held-out split."""
    try:
        splits = heldout_splits(plan)
    except LoraplexError as exc:
        return {"threshold": KEEP_THRESHOLD, "skipped": exc.render(), "datasets": {}}
    rows: dict[str, dict] = {}
    for name, split in splits.items():
        if isinstance(split, str):
            rows[name] = {"skipped": split}
            continue
        with reference.disable_adapter():
            base = heldout_metrics(reference, split)["loss"]
        reference.base_model.set_adapter(name, inference_mode=True)
        adapter = heldout_metrics(reference, split)["loss"]
        merged_loss = heldout_metrics(merged, split)["loss"]
        gain = base - adapter
        kept = (base - merged_loss) / gain if gain > 0 else None
        rows[name] = {"base": base, "adapter": adapter, "merged": merged_loss, "kept": kept, "rows": len(split),
                      "below_threshold": kept is not None and kept < KEEP_THRESHOLD}
    return {"threshold": KEEP_THRESHOLD, "datasets": rows}


def heldout_splits(plan: MergePlan) -> dict:
    """name -> the held-out split training used (from RUN/recipe.resolved.yaml), or why there is none."""
    import yaml

    from .pipeline import open_recipe
    from .recipe import load_recipe

    path = plan.run_dir / "recipe.resolved.yaml"
    if not path.is_file():
        raise LoraplexError(f"{path} is missing, so the held-out splits are unknown")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["model"] = {**(raw.get("model") or {}), "path": plan.base.location, "gguf_file": None}
    in_recipe = {d.get("name") for d in raw.get("datasets") or []}
    names = [n for n in plan.adapters if n in in_recipe]
    prepared = open_recipe(load_recipe(raw), only=names).prepare() if names else {}
    splits: dict = {n: "not a dataset of the run's recipe" for n in plan.adapters if n not in in_recipe}
    for name in names:
        data, recorded = prepared[name], plan.adapters[name].meta.get("dataset_fingerprint")
        if recorded and recorded != data.fingerprint:
            splits[name] = f"the data files changed since training (fingerprint {recorded} -> {data.fingerprint})"
        elif data.val is None or not len(data.val):
            splits[name] = "the dataset has no held-out split (val_size 0 and no val_path)"
        else:
            splits[name] = data.val
    return splits


# --------------------------------------------------------------------------- rendering (rich)


def render_merge(report: dict) -> list:
    """Rich renderables for `loraplex merge`: adapters, verification, held-out loss kept."""
    from rich.table import Table
    from rich.text import Text

    adapters = Table(title=f"merged adapters (method {report['method_requested']} → {report['method']}, "
                     f"{'exact' if report['exact'] else 'NOT an exact sum'})", title_justify="left")
    for col in ("adapter", "target modules", "r", "alpha", "rsLoRA/DoRA", "scaling", "weight"):
        adapters.add_column(col, justify="left" if col in ("adapter", "target modules") else "right")
    for a in report["adapters"]:
        targets = a["target_modules"] if isinstance(a["target_modules"], str) else ",".join(a["target_modules"])
        adapters.add_row(a["name"], targets, str(a["r"]), f"{a['lora_alpha']:g}",
                         f"{'yes' if a['use_rslora'] else 'no'}/{'yes' if a['use_dora'] else 'no'}",
                         a["scaling_formula"], f"{a['weight']:g}")
    w, lg = report["verification"]["weights"], report["verification"]["logits"]
    lines = report["notes"] + [
        f"weights: max |W' − ({w['reference']})| = {w['max_abs_diff']:.3e} over {len(w['modules'])} modules, "
        f"{w['max_relative']:.3e} of max|W| (tolerance {w['tolerance_relative']:g} of max(|W|, |W'|)); other weights "
        "unchanged",
        f"logits on {lg['prompts']} prompts: max |merged − {lg['reference']}| = {lg['max_abs_diff']:.3e} "
        f"(tolerance {lg['tolerance']:.3e})",
    ]
    if not report["exact"]:
        deviation = max(e.get("exact_sum_relative_deviation", 0.0) for e in w["modules"].values())
        lines.append(f"deviation from the exact sum W + Σ wᵢ·scalingᵢ·Bᵢ@Aᵢ: {deviation:.3e} of max|W|")
    out = [adapters, Text("\n".join(lines))]
    out += _heldout_table(report["heldout"])
    out.append(Text(f"merged model: {report['out_dir']} (report in {REPORT_NAME}; loads with "
                    "AutoModelForCausalLM.from_pretrained, no peft needed)"))
    return out


def _heldout_table(heldout: dict) -> list:
    from rich.table import Table
    from rich.text import Text

    if heldout.get("skipped"):
        return [Text(f"held-out loss not measured: {heldout['skipped']}")]
    table = Table(title=f"held-out loss on each adapter's own data (flag: merged keeps < {heldout['threshold']:.0%} "
                  "of the adapter's improvement)", title_justify="left")
    for col in ("dataset", "base", "adapter", "merged", "improvement kept"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    skipped = []
    for name, row in heldout["datasets"].items():
        if "skipped" in row:
            skipped.append(f"{name}: held-out loss not measured: {row['skipped']}")
            continue
        kept = "n/a (no improvement)" if row["kept"] is None else f"{row['kept']:.0%}"
        if row["below_threshold"]:
            kept = f"[bold red]{kept} < {heldout['threshold']:.0%}[/]"
        table.add_row(name, f"{row['base']:.4f}", f"{row['adapter']:.4f}", f"{row['merged']:.4f}", kept)
    return ([table] if table.row_count else []) + [Text(line) for line in skipped]

