"""`loraplex train`: one LoRA adapter per dataset, every one against the pristine base.

The base model is loaded once. For each dataset a PEFT LoRA is injected with that dataset's own target
modules and settings, trained with the HF Trainer, saved, then unloaded (never merged), which restores
the original modules. A fingerprint of every base weight is taken before training and after each
adapter; any difference stops the run.
"""
from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_dir, atomic_write_json
from ..data.prepare import PreparedDataset
from ..errors import LoraplexError
from ..evaluate import heldout_metrics
from ..models import base_fingerprint, load_model, pick_dtype
from ..pipeline import Workspace, open_recipe
from ..recipe import DatasetSpec, Recipe, save_resolved
from .trainer import make_trainer

ADAPTER_META = "loraplex.json"
RUN_META = "run.json"


@dataclass
class RunResult:
    run_dir: Path
    adapters: dict[str, dict] = field(default_factory=dict)  # name -> loraplex.json contents


def is_complete(adapter_dir: Path) -> bool:
    """An adapter folder counts only when its metadata (written last, atomically) is there."""
    return (adapter_dir / ADAPTER_META).is_file() and (adapter_dir / "adapter_model.safetensors").is_file()


def train(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None, only: list[str] | None = None,
          resume: bool = False, overwrite: bool = False, progress: bool = True,
          allow_pickle: bool = False) -> RunResult:
    """Train one adapter per dataset (or the `only` ones); returns each adapter's metadata.

    The base's weights are read from safetensors only, unless `allow_pickle` (trusted `.bin` files).
    """
    ws = open_recipe(recipe, overrides, only)
    run_dir = ws.recipe.run_dir()
    _claim_run_dir(run_dir, ws, resume, overwrite)
    prepared = ws.prepare()
    model = load_model(ws.base, pick_dtype(ws.recipe.model.dtype), ws.recipe.model.trust_remote_code,
                       allow_pickle=allow_pickle)
    if torch.cuda.is_available():
        model.to("cuda")
    pristine = base_fingerprint(model)
    result = RunResult(run_dir)
    for spec in ws.selected():
        adapter_dir = run_dir / "adapters" / spec.name
        if is_complete(adapter_dir) and resume:
            result.adapters[spec.name] = json.loads((adapter_dir / ADAPTER_META).read_text(encoding="utf-8"))
            continue
        meta = train_adapter(model, spec, prepared[spec.name], ws, run_dir, pristine, resume, progress)
        after = base_fingerprint(model)
        if after != pristine:
            raise LoraplexError(f"the base weights changed while training '{spec.name}' (fingerprint {pristine} -> "
                                f"{after}); the adapter was saved, but later adapters would not train on the "
                                "pristine base. This is a bug: please report it")
        result.adapters[spec.name] = meta
    return result


def _claim_run_dir(run_dir: Path, ws: Workspace, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: a folder holding another recipe's run, or finished adapters, needs a flag."""
    meta_path = run_dir / RUN_META
    fingerprint = ws.recipe.fingerprint()
    if meta_path.is_file():
        previous = _read_run_meta(meta_path)
        if previous.get("recipe_fingerprint") != fingerprint:
            if not overwrite:
                raise LoraplexError(f"{run_dir} holds a run of a different recipe (fingerprint "
                                    f"{previous.get('recipe_fingerprint')} vs {fingerprint}); pass --overwrite to "
                                    "replace it, or set another run_name")
            shutil.rmtree(run_dir)
        else:
            for spec in ws.selected():
                adapter_dir = run_dir / "adapters" / spec.name
                if is_complete(adapter_dir) and not resume:
                    if not overwrite:
                        raise LoraplexError(f"adapter '{spec.name}' is already trained in {adapter_dir}; "
                                            "pass --resume to keep it, or --overwrite to train it again")
                    shutil.rmtree(adapter_dir)
                    shutil.rmtree(run_dir / "checkpoints" / spec.name, ignore_errors=True)
                if not resume:
                    shutil.rmtree(run_dir / "checkpoints" / spec.name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, {"recipe_fingerprint": fingerprint, "base_model": ws.base.name})
    save_resolved(ws.recipe, run_dir / "recipe.resolved.yaml")


def _read_run_meta(meta_path: Path) -> dict:
    try:
        previous = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):  # not written by loraplex (its writes are atomic)
        previous = None
    return previous if isinstance(previous, dict) else {"recipe_fingerprint": "unreadable run.json"}


def lora_config(spec: DatasetSpec):
    from peft import LoraConfig

    lora = spec.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                      use_rslora=lora.use_rslora, use_dora=lora.use_dora, target_modules=spec.target_modules,
                      layers_to_transform=lora.layers_to_transform, task_type="CAUSAL_LM")


def parameter_counts(peft_model) -> tuple[int, int]:
    """(trainable, total) of this one adapter on its base; LoRA weights counted once."""
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return trainable, total


def train_adapter(model, spec: DatasetSpec, data: PreparedDataset, ws: Workspace, run_dir: Path,
                  pristine: str, resume: bool, progress: bool) -> dict:
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    set_seed(spec.train.seed)
    base_val = heldout_metrics(model, data.val)
    peft_model = get_peft_model(model, lora_config(spec))
    trainable, total = parameter_counts(peft_model)
    checkpoint_dir = run_dir / "checkpoints" / spec.name
    trainer, stats = make_trainer(peft_model, spec, data, checkpoint_dir, model_dtype=model.dtype, progress=progress)
    started = time.perf_counter()
    last = _last_checkpoint(checkpoint_dir) if resume else None
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    wall = time.perf_counter() - started
    adapter_val = heldout_metrics(peft_model, data.val)
    probe = _probe_batch(data, peft_model)
    expected_logits = _logits(peft_model, probe)
    adapter_dir = run_dir / "adapters" / spec.name
    meta = {
        "name": spec.name, "base_model": ws.base.name, "base_model_location": ws.base.location,
        "base_fingerprint": pristine, "recipe_fingerprint": ws.recipe.fingerprint(),
        "dataset_fingerprint": data.fingerprint, "dataset_files": spec.files("path"),
        "config": spec.model_dump(mode="json"),
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total,
        "train_loss_curve": stats.loss_curve, "steps": trainer.state.global_step,
        "heldout_loss_base": base_val["loss"], "heldout_loss": adapter_val["loss"],
        "heldout_token_accuracy_base": base_val["token_accuracy"],
        "heldout_token_accuracy": adapter_val["token_accuracy"], "heldout_tokens": adapter_val["tokens"],
        "tokens_trained": stats.tokens, "wall_time_s": wall, "tokens_per_s": stats.tokens / max(stats.seconds, 1e-9),
        "peak_memory_mb": _peak_memory_mb(), "dtype": str(model.dtype).replace("torch.", ""),
    }
    with atomic_dir(adapter_dir) as tmp:
        peft_model.save_pretrained(tmp)
        atomic_write_json(tmp / ADAPTER_META, meta)
    model = peft_model.unload()  # removes the LoRA layers without merging them
    reloaded = PeftModel.from_pretrained(model, adapter_dir)
    diff = float((_logits(reloaded, probe) - expected_logits).abs().max())
    reloaded.unload()
    meta["reload_max_abs_diff"] = diff
    atomic_write_json(adapter_dir / ADAPTER_META, meta)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return meta


def _last_checkpoint(checkpoint_dir: Path) -> Path | None:
    checkpoints = sorted(checkpoint_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [c for c in checkpoints if (c / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def _probe_batch(data: PreparedDataset, model) -> torch.Tensor:
    rows = data.val if data.val is not None and len(data.val) else data.train
    device = next(model.parameters()).device
    return torch.tensor([rows[0]["input_ids"]], device=device)


@torch.no_grad()
def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=input_ids).logits.float()
    model.train(was_training)
    return out


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
