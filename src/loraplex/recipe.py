"""The recipe: one base model, several datasets, one adapter per dataset with its own settings.

A recipe is YAML. Each entry of `datasets:` gets its own `target_modules`, `lora:` and `train:`;
`defaults:` fills whatever an entry leaves out (nested blocks are merged key by key). Dotted
`key=value` overrides (`datasets.zh.lora.r=32`, `defaults.train.lr=1e-4`) apply before validation.
Every problem is reported at once, each on one line with its fix.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .checkers import CHECKER_NAMES
from .columns import canonical_columns
from .errors import RecipeError, friendly_validation_message, unknown_name_message
from .lora_settings import LoraSettings, quantization_problems, without_default_variant
from .overrides import apply_override
from .train_settings import TrainSettings

DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
RESERVED_NAMES = ("base", "auto")  # the server's names for the base model and the router
HUB_PREFIX = "hf:"  # a dataset path "hf:owner/name[:split]" is a hub dataset, loaded through `datasets`


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """The base model every adapter trains against."""

    path: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), an HF model "
                      "directory, a hub id, or a .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` when `path` is a directory")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; 'auto' = bfloat16 where the CPU/GPU supports it, else float32")
    trust_remote_code: bool = Field(False, description="allow model code from the model's repository")
    quantization: Literal["4bit", "8bit"] | None = Field(
        None, description="load the base quantized through bitsandbytes for training (4bit = QLoRA); adapters "
        "stay full precision and load onto the full-precision base too")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (quantization: 4bit)")
    double_quant: bool = Field(True, description="quantize the 4-bit blocks' absmax values too (quantization: 4bit)")
    gradient_checkpointing: bool | None = Field(
        None, description="recompute activations in the backward pass; default: on with quantization, else off")

    @field_validator("quantization", mode="before")
    @classmethod
    def _none_means_off(cls, value):
        return None if isinstance(value, str) and value.lower() in ("none", "") else value


class AutoSettings(_Strict):
    """How `target_modules: auto` chooses the modules (a probe of every candidate, then short trials)."""

    candidates: list[Union[str, list[str]]] | None = Field(
        None, description="module sets to choose from: module names, lists of them, 'attention', 'mlp' or "
        "'all-linear'; default: each linear module alone, attention, mlp, q_proj+v_proj and all-linear")
    budget: int | None = Field(None, gt=0, description="trainable parameters every candidate gets (its rank is "
                               "set to match); default: those of lora.r on q_proj and v_proj")
    trials: int = Field(3, ge=0, description="the probe's best sets trained in short trials, besides its best set "
                        "of several modules, q_proj+v_proj and all-linear (0: the probe alone decides)")
    probe_batches: int = Field(2, gt=0, description="training batches the probe measures gradients on")
    cost: float = Field(0.25, gt=0, le=1, description="the selection's share of the full training's tokens")
    selection_rows: int = Field(16, gt=0, description="training rows each trial is scored on: carved from the "
                                "training split (never the held-out one, which grades the adapter) and left out of "
                                "the trials' training")


class DatasetSpec(_Strict):
    name: str = Field(pattern=DATASET_NAME_PATTERN, description="adapter name; letters, digits, _ . -")
    path: Union[str, list[str]] = Field(description="data file, save_to_disk folder, hf:owner/name[:split] or a list")
    val_path: Union[str, list[str], None] = Field(None, description="held-out source(s); else val_size of path")
    test_path: Union[str, list[str], None] = Field(None, description="test source(s) for generation metrics")
    checker: Literal[CHECKER_NAMES] = Field("exact", description="how exact match judges answers (loraplex.checkers)")
    format: Literal["auto", "alpaca", "messages", "sharegpt"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="role -> column; LLaMA-Factory/Axolotl names too")
    system: str | None = Field(None, description="system prompt for rows that have none")
    template: Literal["chatml", "llama3"] | None = Field(
        None, description="fallback chat template when the tokenizer has none (or to force one)")
    max_seq_length: int = Field(1024, gt=0)
    max_samples: int | None = Field(None, gt=0, description="read only the first N rows of path")
    val_size: float = Field(0.1, ge=0, lt=1, description="fraction held out when val_path is not given")
    on_bad_rows: Literal["error", "skip"] = "error"
    target_modules: Union[list[str], Literal["all-linear", "auto"]] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="module names, 'all-linear', or 'auto' (measured "
        "on this dataset: see `auto`)")
    auto: AutoSettings = Field(default_factory=AutoSettings, description="with target_modules: auto")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        default_factory=list, description="experiment trackers that get one run per adapter (`loraplex[tracking]`)")
    compose_with: list[str] = Field(
        default_factory=list, description="adapters of this recipe loaded, active and frozen while this one trains: "
        "it learns on top of them, so their sum is the model it trained in (they train first)")

    @field_validator("name")
    @classmethod
    def _not_a_served_name(cls, value: str) -> str:
        if value in RESERVED_NAMES:
            raise ValueError(f"'{value}' is a name `loraplex serve` gives to a model of its own (base: the base model, "
                             "auto: the router); name the dataset otherwise")
        return value

    @field_validator("columns")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        return canonical_columns(value)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name(cls, value):
        return [value] if isinstance(value, str) and value not in ("all-linear", "auto") else value

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("target_modules is empty; name at least one module, or use 'all-linear'")
        return value

    def files(self, which: str = "path") -> list[str]:
        value = getattr(self, which)
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)


class Recipe(_Strict):
    model: ModelSpec = Field(default_factory=ModelSpec)
    run_name: str | None = Field(None, pattern=DATASET_NAME_PATTERN, description="default: the recipe file's stem")
    output_dir: str = Field("runs", description="runs are written to <output_dir>/<run_name>")
    defaults: dict[str, Any] = Field(default_factory=dict, description="values every dataset inherits")
    datasets: list[DatasetSpec] = Field(min_length=1)

    # where relative paths are resolved from (the recipe file's folder); not part of the recipe
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @field_validator("model", mode="before")
    @classmethod
    def _path_shorthand(cls, value):
        """`model: default` or `model: meta-llama/Meta-Llama-3-8B-Instruct` means `model: {path: ...}`."""
        return {"path": value} if isinstance(value, str) else value

    def dataset(self, name: str) -> DatasetSpec:
        for spec in self.datasets:
            if spec.name == name:
                return spec
        raise RecipeError(unknown_name_message("dataset", name, [d.name for d in self.datasets]))

    def resolve(self, path: str) -> Path:
        """A path from the recipe, relative to the recipe's folder; a hub id (hf:...) is kept as it is."""
        if path.startswith(HUB_PREFIX):
            return Path(path)
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def run_dir(self) -> Path:
        return (self.resolve(self.output_dir) / (self.run_name or "run")).resolve()

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (defaults already merged into each dataset)."""
        data = self.model_dump(mode="json", exclude={"base_dir"})
        data["defaults"] = {}
        return data

    def fingerprint(self) -> str:
        """A hash of what the run trains. Settings that change nothing (`auto` without `target_modules: auto`, an
        empty `compose_with`, the default `checker`) are left out, so runs written before those fields existed keep
        their fingerprint."""
        data = self.to_dict()
        for entry in data["datasets"]:
            entry.pop("report_to", None)  # where figures are sent changes no weight
            if entry.get("target_modules") != "auto":
                entry.pop("auto", None)
            if not entry.get("compose_with"):
                entry.pop("compose_with", None)
            if entry.get("checker") == "exact":
                entry.pop("checker", None)
            entry["lora"] = without_default_variant(entry["lora"])
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def load_recipe(source: str | Path | dict, overrides: list[str] | None = None) -> Recipe:
    """Read, merge defaults, apply overrides, validate. Raises RecipeError listing every problem."""
    if isinstance(source, dict):
        raw, base_dir, stem = copy.deepcopy(source), Path.cwd(), "run"
    else:
        path = Path(source)
        raw, base_dir, stem = _read_yaml(path), path.resolve().parent, path.stem
    if isinstance(raw.get("model"), str):  # the shorthand, before overrides such as model.dtype=... reach into it
        raw["model"] = {"path": raw["model"]}
    problems: list[str] = []
    for item in overrides or []:
        try:
            apply_override(raw, item)
        except RecipeError as exc:
            problems.extend(exc.problems)
    problems.extend(_check_datasets(raw, base_dir))
    recipe = _validate(raw, base_dir, problems)
    problems.extend(_compose_problems(recipe))
    problems.extend(_variant_problems(recipe))
    if problems:
        raise RecipeError(problems, title="recipe is invalid")
    if recipe.run_name is None:
        recipe.run_name = stem
    return recipe


def _compose_problems(recipe: Recipe) -> list[str]:
    """compose_with: known names, not itself, no cycle."""
    names = [d.name for d in recipe.datasets]
    problems = [f"datasets[{d.name}].compose_with: " + (f"'{other}' is this dataset itself; name other adapters"
                if other == d.name else unknown_name_message("dataset", other, names))
                for d in recipe.datasets for other in d.compose_with if other == d.name or other not in names]
    if not problems:
        try:
            compose_order(recipe.datasets)
        except RecipeError as exc:
            problems += exc.problems
    return problems


def _variant_problems(recipe: Recipe) -> list[str]:
    """LoRA variants the base's precision rules out; per-module patterns with `target_modules: auto`."""
    problems = []
    for d in recipe.datasets:
        problems += quantization_problems(d.lora, recipe.model.quantization, f"datasets[{d.name}]")
        if d.target_modules == "auto" and (d.lora.rank_pattern or d.lora.alpha_pattern):
            problems.append(f"datasets[{d.name}].lora: rank_pattern/alpha_pattern with target_modules: auto, which "
                            "sets one rank for its parameter budget; name the modules, or drop the patterns")
    return problems


def compose_order(specs: list) -> list:
    """`specs` with every adapter after those it is composed with (recipe order otherwise); refuses cycles."""
    by_name = {s.name: s for s in specs}
    done: list = []
    visiting: list[str] = []

    def visit(spec) -> None:
        if any(d.name == spec.name for d in done):
            return
        if spec.name in visiting:
            cycle = visiting[visiting.index(spec.name):] + [spec.name]
            raise RecipeError(f"datasets[{spec.name}].compose_with: a cycle ({' -> '.join(cycle)}); an adapter "
                              "can only be composed with adapters that train before it")
        visiting.append(spec.name)
        for other in spec.compose_with:
            if other in by_name:
                visit(by_name[other])
        visiting.pop()
        done.append(spec)

    for spec in specs:
        visit(spec)
    return done


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist; `loraplex init {path}` writes an example")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: malformed YAML ({problem}); check the indentation and quoting there") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping (model:, defaults:, datasets:), got {type(raw).__name__}")
    return raw


def _validate(raw: dict, base_dir: Path, problems: list[str]) -> Recipe:
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(f"defaults: must be a mapping of dataset settings, got {defaults!r}")
        defaults = {}
    problems.extend(_check_keys(defaults, DatasetSpec, "defaults", exclude={"name", "path"}))
    merged = dict(raw)
    datasets = raw.get("datasets")
    if isinstance(datasets, list):
        merged["datasets"] = [_merge(defaults, d) if isinstance(d, dict) else d for d in datasets]
    if "base_dir" in raw:  # internal (the recipe's folder); a YAML value would be silently replaced
        problems.append("base_dir: " + unknown_name_message("key", "base_dir", _public_fields(Recipe)))
    merged["base_dir"] = base_dir
    try:
        return Recipe.model_validate(merged)
    except ValidationError as exc:
        problems.extend(_describe_validation(exc, raw, defaults))
        raise RecipeError(problems, title="recipe is invalid") from None


def _merge(defaults: dict, entry: dict) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in entry.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _check_keys(data: dict, model: type[BaseModel], where: str, exclude: set[str] = frozenset()) -> list[str]:
    problems = []
    fields = {k: f for k, f in model.model_fields.items() if k not in exclude}
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{where}: " + unknown_name_message("key", str(key), list(fields)))
            continue
        sub = fields[key].annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            problems.extend(_check_keys(value, sub, f"{where}.{key}"))
    return problems


def _describe_validation(exc: ValidationError, raw: dict, defaults: dict) -> list[str]:
    lines: list[str] = []
    for err in exc.errors():
        loc = list(err["loc"])
        where, from_defaults = _loc_name(loc, raw, defaults)
        if err["type"] == "extra_forbidden":
            if from_defaults:
                continue  # already reported by _check_keys
            parent = _model_at(loc[:-1])
            known = _public_fields(parent) if parent else []
            lines.append(f"{where}: " + unknown_name_message("key", str(loc[-1]), known))
            continue
        shown = repr(err.get("input"))
        given = "" if err["type"] == "missing" else f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
        line = f"{where}: {friendly_validation_message(err)}{given}"
        if line not in lines:
            lines.append(line)
    return lines


def _public_fields(model: type[BaseModel]) -> list[str]:
    return [name for name, field in model.model_fields.items() if not field.exclude]


def _loc_name(loc: list, raw: dict, defaults: dict) -> tuple[str, bool]:
    """('datasets', 0, 'lora', 'r') -> 'datasets[zh].lora.r', or 'defaults.lora.r' if inherited."""
    parts: list[str] = []
    if len(loc) >= 2 and loc[0] == "datasets" and isinstance(loc[1], int):
        entries = raw.get("datasets") or []
        entry = entries[loc[1]] if loc[1] < len(entries) else None
        entry = entry if isinstance(entry, dict) else {}
        inner = [str(p) for p in loc[2:] if isinstance(p, str) and p not in _UNION_TAGS]
        if inner and _has_key(defaults, inner) and not _has_key(entry, inner):
            return "defaults." + ".".join(inner), True
        parts.append(f"datasets[{entry.get('name') or loc[1]}]")
        loc = loc[2:]
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{p}]"]
        elif p not in _UNION_TAGS:
            parts.append(str(p))
    return ".".join(parts), False


_UNION_TAGS = {"list[str]", "str", "literal['all-linear','auto']", "list[int]", "int",
               "list[union[str,list[str]]]"}


def _has_key(node: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _model_at(loc: list) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for p in loc:
        if isinstance(p, int):
            continue
        field = model.model_fields.get(str(p))
        if field is None:
            return None
        ann = field.annotation
        if p == "datasets":
            ann = DatasetSpec
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _check_datasets(raw: dict, base_dir: Path) -> list[str]:
    """Duplicate names and missing files, checked on the raw entries so they join the schema errors."""
    problems: list[str] = []
    listed = raw.get("datasets") if isinstance(raw.get("datasets"), list) else []
    entries = [e for e in listed if isinstance(e, dict)]
    names = [e.get("name") for e in entries]
    for name in sorted({n for n in names if isinstance(n, str) and names.count(n) > 1}):
        problems.append(f"datasets: the name '{name}' is used {names.count(name)} times; each adapter needs its own "
                        "name")
    for entry in entries:
        for which in ("path", "val_path", "test_path"):
            files = entry.get(which)
            for file in [files] if isinstance(files, str) else (files if isinstance(files, list) else []):
                if str(file).startswith(HUB_PREFIX):
                    continue  # loaded (from the local cache first) when the data is prepared
                full = Path(str(file)).expanduser()
                full = full if full.is_absolute() else base_dir / full
                if not full.exists():
                    problems.append(f"datasets[{entry.get('name')}].{which}: file {full} does not exist; "
                                    "check the path (relative paths start at the recipe's folder)")
    return problems


def resolved_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe with defaults merged and absolute paths: it loads from anywhere as it is."""
    data = recipe.to_dict()
    data["output_dir"] = str(recipe.resolve(recipe.output_dir).resolve())
    local_model = recipe.resolve(recipe.model.path)
    if recipe.model.path != "default" and local_model.exists():
        data["model"]["path"] = str(local_model.resolve())
    for entry, spec in zip(data["datasets"], recipe.datasets):
        for which in ("path", "val_path", "test_path"):
            if spec.files(which):
                absolute = [f if f.startswith(HUB_PREFIX) else str(recipe.resolve(f).resolve())
                            for f in spec.files(which)]
                entry[which] = absolute[0] if isinstance(getattr(spec, which), str) else absolute
    return data
