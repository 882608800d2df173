"""`loraplex train`: one LoRA adapter per dataset, every one against the pristine base.

The base model is loaded once (in 4 or 8 bit with `model.quantization`: QLoRA). For each dataset a PEFT
LoRA is injected with that dataset's own target modules and settings, trained with the HF Trainer, saved,
then unloaded (never merged), which restores the original modules. A fingerprint of every base weight
(for a quantized base: the packed codes and their quantization state) is taken before training and after
each adapter; any difference stops the run. `target_modules: auto` is decided first (`loraplex.selection`);
an adapter with `compose_with` trains after those adapters, with them loaded, active and frozen beside it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..adapters import attach
from ..atomic import atomic_dir, atomic_write_json, remove_leftovers
from ..data.prepare import PreparedDataset
from ..device import dtype_name, on_gpu
from ..errors import LoraplexError
from ..models import base_fingerprint
from ..pipeline import Workspace, open_recipe
from ..recipe import DatasetSpec, Recipe
from ..records import AdapterRecord, RecordError, RunRecord, read_record, write_record
from ..run import (ADAPTER_META, ADAPTER_WEIGHTS, RUN_META, adapter_dir, adapter_metadata, base_changed_message,
                   checkpoint_dir, is_complete, percent_of_base, record_entries, stale_outputs, weights_hash,
                   writer_lock)
from ..lm.base import load_base
from ..lm.packed import heldout_metrics
from ..lm.settings import lora_config, micro_batch_tokens
from ..selection import choose_modules, resolved_spec
from ..selection.composed import composed_folders
from ..tracking import check_trackers, finish_training, start_tracking
from ..distributed_settings import strategy_problems
from .distributed import (deepspeed_config, end_deepspeed, full_adapter_state, gather, is_main, launched, on_main,
                          shard, sharded, sum_over_processes, wait_for_everyone, world_size, zero3)
from .plan import KEEP, NEW, NOT_IN_RECIPE, REMOVED, RETRAIN, Step, fingerprint, fingerprint_parts, plan_run
from .trainer import TrainStats, loss_curve, make_trainer
from .variants import Variant


@dataclass
class RunResult:
    run_dir: Path
    adapters: dict[str, dict] = field(default_factory=dict)  # name -> loraplex.json contents, kept ones too
    steps: list[Step] = field(default_factory=list)  # what train did with each adapter of the run folder, and why
    stale: list[str] = field(default_factory=list)  # outputs (eval, merges) made with adapters since replaced


def train(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None, only: list[str] | None = None,
          resume: bool = False, overwrite: bool = False, progress: bool = True, allow_pickle: bool = False,
          prune: bool = False, say: Callable[[str], None] | None = None) -> RunResult:
    """Train the adapters that are missing or whose settings changed (`only`: just these); keep the others.

    Incremental, like a build: an adapter whose fingerprint (`training.plan`) is unchanged is kept untouched;
    `overwrite` retrains the named ones anyway; `resume` continues an adapter from its last checkpoint when that
    checkpoint was made with the same settings. Adapters of the run folder that the recipe no longer names are
    kept, unless `prune`. Each adapter is replaced atomically, so a kill leaves the previous one whole. The base's
    weights are read from safetensors only, unless `allow_pickle` (trusted `.bin` files). `say` hears one line
    per notable event (a lock taken over, checkpoints discarded).
    """
    say = say or (lambda line: None)
    ws = open_recipe(recipe, overrides, only)
    problems = strategy_problems(ws.recipe.distributed, ws.recipe.model.quantization, on_gpu()) if launched() else []
    if problems:
        raise LoraplexError(problems[0])
    run_dir = ws.recipe.run_dir()
    names = [spec.name for spec in ws.selected()]
    _check_run_meta(run_dir / RUN_META)
    check_trackers(ws.selected())
    prepared = ws.prepare()
    with _writer(run_dir, [f"adapter-{name}" for name in names], say):
        if is_main():
            for name in names:
                for leftover in remove_leftovers(run_dir / "adapters", name):
                    say(f"removed {leftover} in {run_dir / 'adapters'}, left by an interrupted write")
        steps = gather(plan_run(ws.recipe, names, prepared, run_dir, overwrite, ws.dtype) if is_main() else None)[0]
        if is_main():
            _open_run_dir(run_dir, ws, steps, prune, say)
        wait_for_everyone()
        result = RunResult(run_dir, steps=steps)
        if any(step.trains for step in steps):
            _train_steps(ws, prepared, run_dir, steps, result, resume, progress, allow_pickle, say)
        for step in steps:
            if not step.trains and is_complete(adapter_dir(run_dir, step.name)):
                result.adapters.setdefault(step.name, adapter_metadata(adapter_dir(run_dir, step.name)))
    result.adapters = {s.name: result.adapters[s.name] for s in steps if s.name in result.adapters}  # plan order
    result.stale = stale_outputs(run_dir)
    return result


def _train_steps(ws: Workspace, prepared: dict, run_dir: Path, steps: list[Step], result: RunResult, resume: bool,
                 progress: bool, allow_pickle: bool, say: Callable[[str], None]) -> None:
    """Load the base once and train every adapter whose step says so, in plan order."""
    model, base_record = load_base(ws, allow_pickle, on_device=not sharded(ws.recipe.distributed.strategy))
    dtype = ws.dtype
    pristine = base_record.get("quantized_base_fingerprint", base_record["base_fingerprint"])  # the weights in memory
    _same_everywhere(pristine)
    _retrain_on_changed_base(run_dir, steps, base_record)
    base_losses: dict[str, dict] = {}  # tokenized rows' key -> the base's held-out metrics (adapters sharing data)
    for step in steps:
        if not step.trains:
            continue
        spec = ws.recipe.dataset(step.name)
        composed = {name: weights_hash(adapter_dir(run_dir, name)) for name in spec.compose_with}
        parts = fingerprint_parts(spec, ws.recipe, prepared[spec.name], composed, dtype)
        key = fingerprint(parts)
        resume_here = _prepare_checkpoints(checkpoint_dir(run_dir, spec.name), key, resume, say)
        selection = None
        if spec.target_modules == "auto":
            # decided by the main process alone, in the model it trains in (compose_with); every process trains it
            selection = on_main(choose_modules, model, spec, prepared[spec.name], pristine, micro_batch_tokens(spec),
                                progress, composed_folders(spec, run_dir))
        meta = train_adapter(model, resolved_spec(spec, selection) if selection else spec, prepared[spec.name], ws,
                             run_dir, pristine, resume_here, progress, base_record=base_record,
                             extra={"fingerprint": key, "fingerprint_parts": parts,
                                    **({"selection": selection} if selection else {})}, base_losses=base_losses)
        after = gather(base_fingerprint(model, dtype))  # the isolation check, in every process
        changed = [(rank, fp) for rank, fp in enumerate(after) if fp != pristine]
        if changed:
            raise LoraplexError(base_changed_message(spec.name, pristine, changed[0][1])
                                + (f" (process {changed[0][0]} of {len(after)})" if len(after) > 1 else ""))
        meta["isolation_checked_in_processes"] = len(after)
        if is_main():
            write_record(adapter_dir(run_dir, spec.name) / ADAPTER_META, AdapterRecord.model_validate(meta))
            record_entries(run_dir, ws.recipe, [spec.name])
        wait_for_everyone()
        result.adapters[spec.name] = meta


def _retrain_on_changed_base(run_dir: Path, steps: list[Step], base_record: dict) -> None:
    """A kept adapter whose recorded base weights differ from the ones loaded (same path, new files) retrains."""
    for step in steps:
        if step.action != KEEP:
            continue
        recorded = adapter_metadata(adapter_dir(run_dir, step.name)).get("base_fingerprint")
        if recorded != base_record["base_fingerprint"]:
            step.action, step.reason = RETRAIN, f"base weights changed (fingerprint {recorded} -> " \
                                                f"{base_record['base_fingerprint']})"


@contextlib.contextmanager
def _writer(run_dir: Path, parts: list[str], say: Callable[[str], None]):
    """The run folder's locks on `parts`, taken by the main process; every process of a launch fails alike."""
    problem, stack = None, contextlib.ExitStack()
    if is_main():
        try:
            stack = writer_lock(run_dir, parts, "loraplex train", say)
        except LoraplexError as exc:
            problem = exc.render()
    problem = gather(problem)[0]
    if problem:
        raise LoraplexError(problem)
    with stack:
        yield


def _open_run_dir(run_dir: Path, ws: Workspace, steps: list[Step], prune: bool, say: Callable[[str], None]) -> None:
    """Write run.json, record the kept and new adapters' recipe entries, and with `prune` remove the adapters the
    recipe no longer names."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_record(run_dir / RUN_META, RunRecord(recipe_fingerprint=ws.recipe.fingerprint(), base_model=ws.base.name))
    pruned = [s for s in steps if s.action == NOT_IN_RECIPE and prune]
    with writer_lock(run_dir, [f"adapter-{s.name}" for s in pruned], "loraplex train, pruning", say):
        for step in pruned:
            shutil.rmtree(adapter_dir(run_dir, step.name))
            shutil.rmtree(checkpoint_dir(run_dir, step.name), ignore_errors=True)
            step.action = REMOVED
    record_entries(run_dir, ws.recipe, [s.name for s in steps if s.action in (NEW, KEEP)],
                   drop=[s.name for s in pruned])


def _check_run_meta(path: Path) -> None:
    """A run folder's run.json is loraplex's own (a JSON object); any other file of that name is someone else's."""
    if not path.exists():
        return
    try:
        read_record(path, RunRecord)
    except RecordError:
        raise LoraplexError(f"{path} was not written by loraplex, so {path.parent} is not a loraplex run folder; set "
                            "another run_name or output_dir (nothing was changed)")


def _prepare_checkpoints(folder: Path, key: str, resume: bool, say: Callable[[str], None]) -> bool:
    """Whether to resume from `folder`'s checkpoints: only with `resume` and when they were made with the same
    settings. Checkpoints that will not be resumed from are removed (they belong to this adapter alone)."""
    marker = folder / "fingerprint.json"
    recorded = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") if marker.is_file() else None
    usable = resume and _last_checkpoint(folder) is not None and recorded in (key, None)
    wait_for_everyone()  # every process has read the folder before the main one changes it
    if is_main() and not usable:
        if resume and _last_checkpoint(folder) is not None:
            say(f"not resuming {folder.name}: its checkpoints were made with other settings; training it anew")
        shutil.rmtree(folder, ignore_errors=True)
    if is_main():
        atomic_write_json(marker, {"fingerprint": key})
    wait_for_everyone()
    return usable


def _same_everywhere(fingerprint: str) -> None:
    """Every process must train on the same base weights."""
    seen = gather(fingerprint)
    if len(set(seen)) > 1:
        raise LoraplexError(f"the training processes loaded different base weights (fingerprints {', '.join(seen)}, "
                            "in rank order); every process must read the same model folder")


def parameter_counts(peft_model) -> tuple[int, int]:
    """(trainable, total) of this one adapter on its base; LoRA weights counted once."""
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(_unpacked_numel(p) for p in peft_model.parameters())
    return trainable, total


def _unpacked_numel(param: torch.Tensor) -> int:
    """A bitsandbytes 4-bit weight packs two values per byte; its quant_state keeps the original shape."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return torch.Size(shape).numel() if shape is not None else param.numel()


def train_adapter(model, spec: DatasetSpec, data: PreparedDataset, ws: Workspace, run_dir: Path,
                  pristine: str, resume: bool, progress: bool, base_record: dict | None = None,
                  extra: dict | None = None, base_losses: dict[str, dict] | None = None) -> dict:
    """`base_record` (from `load_base`): the base's fingerprints, dtype and quantization, saved in loraplex.json;
    `extra`: more of loraplex.json (the fingerprint, the module selection); `base_losses`: the pristine base's
    held-out metrics by the tokenized rows' key (`rows_key`), filled and reused across the adapters of one run."""
    from transformers import set_seed

    set_seed(spec.train.seed)
    base_val = _base_heldout(model, data, {} if base_losses is None else base_losses)
    checkpoints = checkpoint_dir(run_dir, spec.name)
    variant = Variant(spec, data.train, checkpoints, ws.base)  # PiSSA & co: the base is put back after unload
    peft_model = variant.inject(model, lora_config(spec))
    trainable, total = parameter_counts(peft_model)
    composed = compose(peft_model, spec, run_dir)
    trained, deepspeed = _training_model(peft_model, ws.recipe.distributed.strategy)
    last = _last_checkpoint(checkpoints) if resume and trained is peft_model else None  # sharded: no checkpoints
    earlier = TrainStats.at(last)  # tokens (of every process) and seconds before the checkpoint resumed from
    trainer, stats = make_trainer(trained, spec, data, checkpoints, progress=progress and is_main(),
                                  stats=TrainStats(earlier.tokens if is_main() else 0, earlier.seconds),
                                  deepspeed=deepspeed)
    tracking = _tracking(trainer, stats, run_dir, ws, spec, resumed=last is not None)
    started = time.perf_counter()
    _train_or_restore(trainer, last)
    wall = time.perf_counter() - started + earlier.seconds
    _gather_adapter(trainer, peft_model)
    tokens = sum_over_processes(stats.tokens)
    composed_val = heldout_metrics(peft_model, data.val) if composed else None  # the model it trained in
    peft_model.base_model.set_adapter(DEFAULT_ADAPTER)  # from here on the adapter alone, as it is saved and loaded
    adapter_val = heldout_metrics(peft_model, data.val)
    probe = _probe_batch(data, peft_model)
    expected_logits = _logits(peft_model, probe)
    folder = adapter_dir(run_dir, spec.name)
    meta = {
        "name": spec.name, "base_model": ws.base.name, "base_model_location": ws.base.location,
        **(base_record or {"base_fingerprint": pristine, "dtype": dtype_name(model.dtype)}),
        "recipe_fingerprint": ws.recipe.fingerprint(),
        "dataset_fingerprint": data.fingerprint, "dataset_files": spec.files("path"),
        "config": spec.model_dump(mode="json"),
        "trainable_params": trainable, "total_params": total,
        "trainable_percent_of_base": percent_of_base({"trainable_params": trainable, "total_params": total}),
        "train_loss_curve": loss_curve(trainer.state), "steps": trainer.state.global_step,
        "heldout_loss_base": base_val["loss"], "heldout_loss": adapter_val["loss"],
        "heldout_token_accuracy_base": base_val["token_accuracy"],
        "heldout_token_accuracy": adapter_val["token_accuracy"], "heldout_tokens": adapter_val["tokens"],
        "tokens_trained": tokens, "wall_time_s": wall, "tokens_per_s": tokens / max(stats.seconds, 1e-9),
        "peak_memory_mb": _peak_memory_mb(), "processes": world_size(), **(extra or {}),
    }
    if "selection" in meta:
        meta["selection"] = {**meta["selection"], "full_training_s": wall}
    if composed:
        meta.update(compose_with=composed, heldout_loss_composed=composed_val["loss"],
                    heldout_token_accuracy_composed=composed_val["token_accuracy"])
    _save_adapter(peft_model, variant, meta, folder, (probe, expected_logits))
    finish_training(tracking, meta)
    if is_main():
        write_record(folder / ADAPTER_META, AdapterRecord.model_validate(meta))
        _remove_checkpoints(checkpoints)
    return meta


def _training_model(peft_model, strategy: str) -> tuple:
    """The model the Trainer trains and the DeepSpeed configuration it trains with: `peft_model` itself (None), an
    FSDP-sharded copy (None), or a copy that DeepSpeed's ZeRO-3 engine partitions (its configuration)."""
    if sharded(strategy):
        return shard(peft_model), None
    if zero3(strategy):
        trained = copy.deepcopy(peft_model)
        return trained, deepspeed_config(trained)
    return peft_model, None


def _base_heldout(model, data: PreparedDataset, base_losses: dict[str, dict]) -> dict:
    """The pristine base's held-out metrics on `data`, computed once per set of tokenized rows (`rows_key`)."""
    if data.rows_key not in base_losses:
        base_losses[data.rows_key] = heldout_metrics(model, data.val)
    return base_losses[data.rows_key]


def _gather_adapter(trainer, peft_model) -> None:
    """After training an FSDP-sharded copy (`distributed.shard`): its adapter gathered whole into `peft_model`, which
    saves and checks it; the copy is freed."""
    from peft import set_peft_model_state_dict

    if trainer.model is peft_model:
        return
    set_peft_model_state_dict(peft_model, full_adapter_state(trainer.model), adapter_name=DEFAULT_ADAPTER)
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.deepspeed = None
    end_deepspeed()


def _save_adapter(peft_model, variant: Variant, meta: dict, folder: Path, check: tuple) -> None:
    """Saves the adapter (PEFT files + loraplex.json, swapped in at once), then unloads it, puts back what its
    variant's init changed in the base, and reloads it from `folder`: `check` = (probe batch, the trained model's
    logits on it), whose largest difference goes into `meta`."""
    if is_main():
        with atomic_dir(folder) as tmp:
            peft_model.save_pretrained(tmp, selected_adapters=[DEFAULT_ADAPTER], **variant.save_options())
            write_record(tmp / ADAPTER_META, AdapterRecord.model_validate(meta))
    wait_for_everyone()
    meta["reload_max_abs_diff"] = _reload_diff(peft_model, variant, meta["name"], folder, *check)
    meta["variant"] = variant.record()


def _tracking(trainer, stats: TrainStats, run_dir: Path, ws: Workspace, spec: DatasetSpec, resumed: bool):
    """The adapter's tracked runs (`report_to`), fed by the Trainer's logs; None without trackers or off the main
    process."""
    tracking = start_tracking(run_dir, ws.recipe.run_name, spec, resume=resumed) if is_main() else None
    if tracking:
        trainer.add_callback(tracking.callback(lambda: stats.tokens / max(stats.seconds, 1e-9)))
    return tracking


def _reload_diff(peft_model, variant: Variant, name: str, folder: Path, probe: torch.Tensor,
                 expected_logits: torch.Tensor) -> float:
    """The largest logit difference between the trained adapter and the same adapter reloaded from `folder`; the
    base is left without LoRA layers (unloaded, never merged) and as it was before the variant's init touched it."""
    model = peft_model.unload()
    variant.restore()
    reloaded = attach(model, {name: folder})
    diff = float((_logits(reloaded, probe) - expected_logits).abs().max())
    reloaded.unload()
    return diff


def _remove_checkpoints(checkpoints: Path) -> None:
    shutil.rmtree(checkpoints, ignore_errors=True)
    with contextlib.suppress(OSError):  # another job's checkpoints may still be in there
        checkpoints.parent.rmdir()


DEFAULT_ADAPTER = "default"  # PEFT's name for the adapter get_peft_model creates


def compose(peft_model, spec: DatasetSpec, run_dir: Path) -> dict[str, str]:
    """Load the adapters `spec` is composed with, active and frozen beside the one training; returns each one's
    weights fingerprint (name -> sha256 of its safetensors file)."""
    if not spec.compose_with:
        return {}
    composed_folders(spec, run_dir)
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    fingerprints = {}
    for name in spec.compose_with:
        folder = adapter_dir(run_dir, name)
        peft_model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        fingerprints[name] = weights_hash(folder)
    peft_model.base_model.set_adapter([DEFAULT_ADAPTER, *spec.compose_with])  # every one in the forward...
    for name, param in peft_model.named_parameters():  # ...and only what trained before they came, trained
        param.requires_grad_(name in trainable)
    return fingerprints


def _train_or_restore(trainer, last: Path | None) -> None:
    """Train, from `last` if given. A checkpoint of the final step is restored instead: the Trainer resumed from it
    would run one more step whenever the step count is not a whole number of epochs."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(last / "trainer_state.json")) if last else None
    if state is None or not state.max_steps or state.global_step < state.max_steps:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
        return
    set_peft_model_state_dict(trainer.model, load_file(last / ADAPTER_WEIGHTS), adapter_name=DEFAULT_ADAPTER)
    trainer.state = state


def _last_checkpoint(folder: Path) -> Path | None:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
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
    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
