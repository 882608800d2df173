"""Merge planning: which adapters, at which weights, by which method, and how exact that is; checked before any
model is loaded. Also the interference report: the modules two adapters share and the cosine of their deltas."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from ..device import DTYPES, dtype_name
from ..errors import LoraplexError, ParameterError, unknown_name_message
from ..inspect_adapter import AdapterWeights, read_adapter
from ..lora_settings import loftq_problem
from ..models import BaseModelRef
from ..run import MERGE_REPORT, adapter_dir, complete_adapters, compose_problems



class MergeMethod(str, Enum):
    """How `merge` combines adapters: AUTO, SUM, CAT: the exact weighted sum of the deltas; WEIGHTS_SEARCH: that sum at
    weights searched on held-out rows (`merging.search`); LINEAR, TIES, DARE_LINEAR: PEFT's combinations."""

    AUTO = "auto"
    SUM = "sum"
    CAT = "cat"
    WEIGHTS_SEARCH = "weights-search"
    LINEAR = "linear"
    TIES = "ties"
    DARE_LINEAR = "dare_linear"


SEARCH = MergeMethod.WEIGHTS_SEARCH.value
METHODS = tuple(m.value for m in MergeMethod)
PEFT_METHODS = ("linear", "ties", "dare_linear")
SAVED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class MergePlan:
    """What to merge, validated before any model is loaded."""

    run_dir: Path
    adapters: dict[str, AdapterWeights]
    weights: dict[str, float]
    method: str  # "sum" or one of PEFT_METHODS
    requested: str
    dtype: torch.dtype  # of the saved weights
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


def plan_merge(run_dir: str | Path, adapters: list[str], weights: list[float] | None, method: MergeMethod | str,
               dtype: torch.dtype | str, density: float = 0.5) -> MergePlan:
    """Read and check the adapters, weights and method (the adapters' problems all at once); `dtype` (of the saved
    weights: a torch.dtype, or its name) is resolved here, once."""
    run_dir = Path(run_dir)
    names = _names(adapters)
    method = _method(method)
    dtype = _saved_dtype(dtype)
    if method in ("ties", "dare_linear") and not 0 < density <= 1:
        raise ParameterError("density", f"{density:g} is not a share of values to keep; use 0 < density <= 1")
    if method == SEARCH and weights is not None:
        raise ParameterError("weights", f"method='{SEARCH}' chooses the weights itself; leave weights=None")
    loaded = {name: read_adapter(_adapter_dir(run_dir, name)) for name in names}
    combined = "sum" if method in ("auto", "sum", "cat", SEARCH) else method
    plan = MergePlan(run_dir, loaded, _weights(weights, names), combined, method, dtype,
                     next(iter(loaded.values())).base_ref(), density=density)
    for name, adapter in loaded.items():
        for module in adapter.modules:
            plan.owners.setdefault(module, []).append(name)
    problems = _problems(plan) + compose_problems({name: _adapter_dir(run_dir, name) for name in names})
    if problems:
        raise LoraplexError(problems, title="these adapters cannot be merged")
    plan.note = _method_note(plan)
    return plan


def _saved_dtype(dtype: torch.dtype | str) -> torch.dtype:
    names = [dtype_name(d) for d in SAVED_DTYPES]
    found = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(dtype) if isinstance(dtype, str) else None
    if found not in SAVED_DTYPES:
        raise ParameterError("dtype", unknown_name_message("dtype", str(dtype).replace("torch.", ""), names))
    return found


def _names(adapters: list[str]) -> list[str]:
    if isinstance(adapters, str) or not all(isinstance(name, str) for name in adapters):
        raise ParameterError("adapters", f"{adapters!r} is not a list of adapter names, e.g. adapters=['zh', 'en']")
    names = list(adapters)
    if not names:
        raise ParameterError("adapters", "name at least one adapter of the run, e.g. adapters=['zh', 'en']")
    if len(set(names)) != len(names):
        raise ParameterError("adapters", f"an adapter is named twice in {', '.join(names)}")
    return names


def _method(method: MergeMethod | str) -> str:
    try:
        return MergeMethod(method).value
    except ValueError:
        raise ParameterError("method", unknown_name_message("method", str(method), list(METHODS))) from None


def _weights(weights: list[float] | None, names: list[str]) -> dict[str, float]:
    if weights is None:
        return {name: 1.0 for name in names}
    if isinstance(weights, str) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise ParameterError("weights", f"{weights!r} is not a list of numbers, e.g. weights=[1.0, 0.5]")
    if len(weights) != len(names):
        raise ParameterError("weights", f"{len(weights)} weights for {len(names)} adapters ({', '.join(names)}); "
                             "give one weight per adapter, in the same order")
    return {name: float(w) for name, w in zip(names, weights)}


def _adapter_dir(run_dir: Path, name: str) -> Path:
    known = complete_adapters(run_dir)
    if name in known:
        return adapter_dir(run_dir, name)
    if not known:
        raise LoraplexError(f"{run_dir} holds no trained adapter (no {run_dir}/adapters/<name>/); "
                            "pass the run folder, e.g. runs/<recipe>")
    raise ParameterError("adapters", f"{unknown_name_message('adapter', name, known)} (in {run_dir}/adapters)")


def _problems(plan: MergePlan) -> list[str]:
    problems = []
    for name, adapter in plan.adapters.items():
        problems += loftq_problem(name, adapter.meta, "that a merge writes")
        if adapter.extra_keys:
            problems.append(f"adapter '{name}' holds tensors other than LoRA A/B ({adapter.extra_keys[0]}, ...: "
                            "trained biases, modules_to_save or embeddings); merging those is not supported")
        if adapter.use_dora and plan.method != "sum":
            problems.append(f"adapter '{name}' is a DoRA adapter, which PEFT's {plan.method} cannot combine; "
                            "use method='sum'")
        if adapter.use_dora and plan.requested == SEARCH:
            problems.append(f"adapter '{name}' is a DoRA adapter: it merges at weight 1 only, so there is no weight "
                            f"to search; use method='sum'")
        elif adapter.use_dora and plan.weights[name] != 1.0:
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


def quantized_adapters(plan: MergePlan) -> dict[str, str]:
    """adapter -> how its base was quantized while it trained (QLoRA adapters only)."""
    return {name: a.meta["quantization"] for name, a in plan.adapters.items() if a.meta.get("quantization")}


def precision_note(plan: MergePlan) -> str | None:
    """Adapters trained on a 4/8-bit base merge into the full-precision weights, never into quantized ones."""
    quantized = quantized_adapters(plan)
    if not quantized:
        return None
    kinds = "; ".join(sorted(set(quantized.values())))
    return (f"{', '.join(quantized)} trained on a quantized base ({kinds}): merged onto the full-precision base "
            f"weights ({plan.base.location}, computed in float32, saved as {dtype_name(plan.dtype)}), not into "
            "quantized weights")


def _method_note(plan: MergePlan) -> str:
    if plan.method in PEFT_METHODS and not plan.exact:
        shared = plan.shared_modules()
        why = ["it combines the A's and the B's separately, so cross terms Bᵢ@Aⱼ appear"] if shared else []
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


def claim_out_dir(out_dir: Path, plan: MergePlan, overwrite: bool) -> Path:
    """Refuse to replace a folder that is not a previous merge, or a previous merge without `overwrite`."""
    out_dir = out_dir.expanduser().resolve()
    base, run = Path(plan.base.location).resolve(), plan.run_dir.resolve()
    if out_dir.is_relative_to(base) or any(p.is_relative_to(out_dir) for p in (base, run) if p.exists()):
        raise ParameterError("out_dir", f"{out_dir} would replace or write into the base model, or replace the run; "
                             "choose a new folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MERGE_REPORT).is_file():
            raise ParameterError("out_dir", f"{out_dir} exists and is not a merged model; choose a new folder")
        if not overwrite:
            raise ParameterError("out_dir", f"{out_dir} holds a previous merge; pass overwrite=True to replace it")
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
