"""The run folder: its file names, the adapters' metadata, and the check that a base is the one they trained on.

```
runs/<run>/
  run.json                 the recipe's fingerprint and the base model's name
  recipe.resolved.yaml     the recipe with defaults merged and absolute paths: the run reopens from it
  adapters/<name>/         a PEFT adapter (adapter_config.json, adapter_model.safetensors) and loraplex.json,
                           written last: an adapter folder without it is incomplete
  checkpoints/<name>/      Trainer checkpoints while an adapter trains (removed once it is saved)
  eval.json, report.md, report.html, merged/<name>/
  gguf/<name>/             `loraplex export gguf`: the adapter as a llama.cpp LoRA file and an Ollama Modelfile
```
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
import yaml

from .atomic import LockBusy, atomic_write_text, file_lock, owned_lock
from .errors import LoraplexError, ModelError
from .models import BaseModelRef, base_fingerprint, load_model
from .pipeline import Workspace, open_recipe
from .quantize import describe, quantization_config
from .recipe import resolved_dict
from .records import AdapterRecord, EvalRecord, MergeRecord, RecordError, read_record

ADAPTER_META = "loraplex.json"
RUN_META = "run.json"
RESOLVED_RECIPE = "recipe.resolved.yaml"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EVAL_FILE = "eval.json"
MERGE_REPORT = "merge_report.json"  # in every merged model folder
REPORT_MD, REPORT_HTML, REPORT_ASSETS = "report.md", "report.html", "report-assets"
LOCKS = ".locks"  # who writes which part of the run folder (`writer_lock`)
TRACKING = "tracking"  # experiment trackers' local files, and each adapter's tracked runs (`loraplex.tracking`)


def adapter_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "adapters" / name


def merged_dir(run_dir: str | Path, name: str) -> Path:
    """Where `loraplex demo` puts a merged model of the run (`loraplex merge` writes wherever --out says)."""
    return Path(run_dir) / "merged" / name


def tracking_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / TRACKING


def gguf_dir(run_dir: str | Path) -> Path:
    """Where `loraplex export gguf` writes by default (gguf/<adapter>/, merged GGUF files)."""
    return Path(run_dir) / "gguf"


def checkpoint_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "checkpoints" / name


def is_complete(folder: Path) -> bool:
    """An adapter folder counts only when its metadata (written last, atomically) and weights are there."""
    return (Path(folder) / ADAPTER_META).is_file() and (Path(folder) / ADAPTER_WEIGHTS).is_file()


def complete_adapters(run_dir: str | Path) -> list[str]:
    """Names of the run's finished adapters, sorted; hidden folders (an interrupted replace's) are never adapters."""
    root = Path(run_dir) / "adapters"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and is_complete(p)) \
        if root.is_dir() else []


def weights_hash(folder: Path) -> str | None:
    """sha256 (16 hex digits) of an adapter's weights file: what compose_with, eval and merges record."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def changed_adapters(adapters_root: Path, recorded: dict[str, str],
                     hashes: dict[str, str | None] | None = None) -> dict[str, str]:
    """Of `recorded` (adapter name -> weights hash when something used it), those in `adapters_root` that changed
    since: name -> how. `hashes` (name -> current hash) is filled and reused, so a caller hashes each file once."""
    hashes = {} if hashes is None else hashes
    changed = {}
    for name, digest in recorded.items():
        if name not in hashes:
            hashes[name] = weights_hash(Path(adapters_root) / name)
        now = hashes[name]
        if now != digest:
            changed[name] = "removed" if now is None else "retrained"
    return changed


def compose_problems(adapters: dict[str, Path]) -> list[str]:
    """Of `adapters` (name -> folder), those trained on top of others (compose_with, their sibling folders) that
    have changed since: one line each, naming what to retrain."""
    problems = []
    for name, folder in adapters.items():
        recorded = adapter_metadata(Path(folder)).get("compose_with") or {}
        changed = changed_adapters(Path(folder).parent, recorded)
        if changed:
            what = ", ".join(f"'{other}' was {how}" for other, how in changed.items())
            problems.append(f"adapter '{name}' was trained on top of {', '.join(recorded)} (compose_with), and since "
                            f"then {what}: train '{name}' again (`loraplex train` retrains it)")
    return problems


def writer_lock(run_dir: str | Path, parts: list[str], what: str, say=None) -> contextlib.ExitStack:
    """Exclusive locks on parts of a run folder ('adapter-en', 'eval', 'report', 'demo', 'merge-zh+en'), held while
    writing: use it as a context manager.

    A part another process holds is refused at once, naming that process; a lock whose process died is taken
    over (`say` hears a line about it). The processes of a launch are one writer: lock in the main one only."""
    stack = contextlib.ExitStack()
    try:
        for part in parts:
            stack.enter_context(owned_lock(Path(run_dir) / LOCKS / f"{part}.lock", what, say))
    except LockBusy as exc:
        stack.close()
        raise LoraplexError(f"{run_dir}: {part.replace('-', ' ', 1)} is {exc.problems[0]}; wait for it to finish"
                            + (", or train other adapters meanwhile (only=<names>)" if part.startswith("adapter-")
                               else "")
                            ) from None
    return stack


def adapter_metadata(folder: Path) -> dict:
    """loraplex.json of an adapter folder ({} for an adapter loraplex did not train)."""
    path = Path(folder) / ADAPTER_META
    if not path.is_file():
        return {}
    try:
        return read_record(path, AdapterRecord).as_dict()
    except RecordError as exc:
        raise ModelError(f"{exc.problems[0]}; the adapter folder is damaged: train it again") from None


def count_text(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def percent_of_base(meta: dict) -> float:
    """Trainable parameters as a percentage of the base model's own (total minus the adapter's)."""
    return 100 * meta["trainable_params"] / max(meta["total_params"] - meta["trainable_params"], 1)


def _resolved_recipe(run_dir: Path) -> Path:
    path = Path(run_dir) / RESOLVED_RECIPE
    if not path.is_file():
        raise LoraplexError(f"{run_dir} is not a loraplex run (no {RESOLVED_RECIPE}); "
                            "pass a folder written by `loraplex train`, e.g. runs/<run>")
    return path


def read_recipe(run_dir: str | Path) -> dict:
    """The run's resolved recipe as written (a dict; no model or data is touched)."""
    return yaml.safe_load(_resolved_recipe(Path(run_dir)).read_text(encoding="utf-8"))


def record_entries(run_dir: str | Path, recipe, names: list[str], drop: list[str] = ()) -> None:
    """Write the recipe's entries of `names` into the run's resolved recipe and keep every other recorded entry as it
    was (the settings those adapters trained with); `drop` removes entries. The model block is the recipe's."""
    path = Path(run_dir) / RESOLVED_RECIPE
    with file_lock(Path(run_dir) / LOCKS / "resolved-recipe.lock"):  # jobs of one run folder update it in turn
        data = resolved_dict(recipe)
        previous = {e["name"]: e for e in read_recipe(run_dir).get("datasets") or []} if path.is_file() else {}
        entries = [e if e["name"] in names or e["name"] not in previous else previous[e["name"]]
                   for e in data["datasets"]]
        listed = {e["name"] for e in entries}
        entries += [e for name, e in previous.items() if name not in listed]
        data["datasets"] = [e for e in entries if e["name"] not in drop]
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def stale_outputs(run_dir: str | Path) -> list[str]:
    """What in the run folder was made with adapters that have been retrained or removed since: one line each,
    'what: made with ...'."""
    run_dir = Path(run_dir)
    lines, hashes = [], {}
    evaluation = run_dir / EVAL_FILE
    if evaluation.is_file():
        for row in read_record(evaluation, EvalRecord).rows:
            changed = changed_adapters(run_dir / "adapters", row.get("adapter_weights") or {}, hashes)
            if changed:
                lines.append(f"{EVAL_FILE}, row '{row['name']}': made with {_changes(changed)}")
    for report in sorted((run_dir / "merged").glob(f"*/{MERGE_REPORT}")):
        stale = stale_merge(report.parent, run_dir, hashes)
        if stale:
            lines.append(f"merged/{report.parent.name}: {stale}")
    return lines


def merged_from(folder: Path, run_dir: Path) -> dict[str, str]:
    """Adapter name -> weights hash of the adapters of `run_dir` that the merged model in `folder` was made from
    (its merge_report.json; empty for another run's merge, or one written before hashes were recorded)."""
    path = Path(folder) / MERGE_REPORT
    if not path.is_file():
        return {}
    report = read_record(path, MergeRecord)
    if Path(report.run_dir).resolve() != Path(run_dir).resolve():
        return {}
    return {a.name: a.weights_sha256 for a in report.adapters if a.weights_sha256}


def stale_merge(folder: Path, run_dir: Path, hashes: dict[str, str | None] | None = None) -> str | None:
    """'made with ...' when the merged model in `folder` used adapters of `run_dir` that were replaced since."""
    changed = changed_adapters(Path(run_dir) / "adapters", merged_from(folder, run_dir), hashes)
    return f"made with {_changes(changed)}" if changed else None


def _changes(changed: dict[str, str]) -> str:
    return ", ".join(f"'{name}' before it was {how}" for name, how in changed.items())


def open_run(run_dir: str | Path, only: list[str] | None = None) -> Workspace:
    """The run's resolved recipe (absolute paths) with its base model and tokenizer."""
    return open_recipe(_resolved_recipe(Path(run_dir)), only=only)


# --------------------------------------------------------------------------- is this the adapter's base?

# a weight loaded in the first dtype and cast to the second is bit-identical to one loaded in the second
_EXACT_DOWNCASTS = {(torch.float32, torch.bfloat16), (torch.float32, torch.float16)}


def trained_dtype(meta: dict) -> torch.dtype:
    """The dtype the adapter's base weights were held in while it trained (float32 when not recorded)."""
    found = getattr(torch, str(meta.get("dtype") or "float32"), None)
    return found if isinstance(found, torch.dtype) else torch.float32


def loaded_dtype(model) -> torch.dtype:
    """The dtype of the model's floating base weights as loaded."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def fingerprint_as_trained(model, ref: BaseModelRef, dtype: torch.dtype, quantization=None,
                           quantized_from: torch.dtype | None = None) -> str:
    """The fingerprint of `model`'s base weights as an adapter trained in `dtype` recorded it.

    Fingerprints hash floating weights in the training dtype. A base loaded more precisely is cast down (exact:
    the training load cast the same checkpoint the same way); one loaded less precisely cannot be cast up to
    what training saw, so the base is read again from `ref` in `dtype`. `quantization` (a recipe's `model:`
    block) means `model` is quantized, from `quantized_from`: its codes depend on that dtype, so it is
    compared only when quantized from `dtype`, and read again otherwise.
    """
    loaded = loaded_dtype(model) if quantization is None else quantized_from
    if loaded == dtype or (quantization is None and (loaded, dtype) in _EXACT_DOWNCASTS):
        return base_fingerprint(model, dtype)
    if quantization is None:
        return base_fingerprint(load_model(ref, dtype), dtype)
    return base_fingerprint(load_model(ref, dtype, quantization_config=quantization_config(quantization, dtype)), dtype)


def base_changed_message(name: str, before: str, after: str) -> str:
    """The isolation check's refusal: the base in memory changed while an adapter trained."""
    return (f"the base weights changed while training '{name}' (fingerprint {before} -> {after}); the adapter was "
            "saved, but later adapters would not train on the pristine base. This is a bug: please report it")


def base_problem(name: str, folder: Path, meta: dict, ref: BaseModelRef, fingerprint: str,
                 quantized_as: str | None = None) -> str | None:
    """The one refusal message: the adapter recorded another base than the one loaded (None if it did not)."""
    key = "quantized_base_fingerprint" if quantized_as else "base_fingerprint"
    recorded = meta.get(key)  # a plain LoRA adapter records no quantized base: nothing to compare on a 4-bit load
    if not recorded or recorded == fingerprint:
        return None
    trained_on = meta.get("base_model", "another model")
    loaded = ref.name
    if quantized_as:
        trained_on += f" quantized as {meta.get('quantization', '?')}"
        loaded += f" quantized as {quantized_as}"
    return (f"adapter '{name}' ({folder}) was trained on {trained_on} (base fingerprint {recorded}), but the base "
            f"loaded from {ref.location} is {loaded} (fingerprint {fingerprint}); load it with the base it was "
            "trained on")


def check_base(model, ref: BaseModelRef, adapters: dict[str, Path], quantization=None,
               quantized_from: torch.dtype | None = None) -> None:
    """Refuse adapters whose recorded base differs from `model` (all of them at once, one line each).

    Each adapter is compared in its own training dtype, whatever dtype `model` was loaded in. `quantization`: the
    recipe's `model:` block `model` was quantized with (None for a full-precision base), from `quantized_from`.
    """
    quantized_as = describe(quantization, quantized_from) if quantization is not None else None
    problems, fingerprints = [], {}
    for name, folder in adapters.items():
        meta = adapter_metadata(Path(folder))
        dtype = trained_dtype(meta)
        if dtype not in fingerprints:
            fingerprints[dtype] = fingerprint_as_trained(model, ref, dtype, quantization, quantized_from)
        problem = base_problem(name, Path(folder), meta, ref, fingerprints[dtype], quantized_as)
        if problem:
            problems.append(problem)
    if problems:
        raise ModelError(problems, title="adapters trained on another base" if len(problems) > 1 else None)
