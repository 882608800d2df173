"""The HF Trainer, set up for one adapter: answer-only loss, packing, progress with loss and tokens/s.

Gradient accumulation, schedulers, checkpoints, resume and multi-process launch (accelerate) all come
from transformers' Trainer; loraplex only supplies the batches, the loss and the progress display.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..atomic import atomic_write_json
from ..data.prepare import PreparedDataset
from ..device import on_gpu
from ..errors import LoraplexError
from ..recipe import DatasetSpec
from ..lm.packed import (PackedCollator, PaddedCollator, answer_count, answer_loss_sum, packed_attention, real_tokens,
                       split_packed)
from ..lm.compiled import compile_blocker, compile_layers, compiled_attention
from ..lm.settings import micro_batch_tokens
from .distributed import count_deepspeed_processes_on_cpu, sum_over_processes, world_size
from ..lm.dropout import use_lora_dropout
from .variants import loraplus_optimizer


# `train.compile: auto` per device type (benchmarks/README.md, "Compiled step")
COMPILE_BY_DEFAULT = {"cpu": False, "cuda": False}
PROGRESS_FILE = "loraplex_progress.json"  # TrainStats in each checkpoint folder


@dataclass
class TrainStats:
    """Real (non-padding) tokens trained on and seconds spent in optimizer steps, kept with each checkpoint."""

    tokens: int = 0
    seconds: float = 0.0

    def save(self, checkpoint: Path) -> None:
        atomic_write_json(checkpoint / PROGRESS_FILE, asdict(self))

    @classmethod
    def at(cls, checkpoint: Path | None) -> "TrainStats":
        """The counts when `checkpoint` was written (zero without one, or for a checkpoint that lacks them)."""
        path = checkpoint / PROGRESS_FILE if checkpoint else None
        return cls(**json.loads(path.read_text(encoding="utf-8"))) if path and path.is_file() else cls()


def loss_curve(state) -> list[dict]:
    """[{"step", "loss"}] from the Trainer's log history (restored from the checkpoint on resume)."""
    return [{"step": e["step"], "loss": float(e["loss"])} for e in state.log_history if "loss" in e and "step" in e]


SOURCES_KEY = "loraplex_sources"  # a batch key the model never sees; compute_loss pops it


class AdapterTrainer(Trainer):
    """Trainer whose loss covers answer tokens only and skips the LM head on unlabelled positions.

    A packed batch longer than `micro_batch_tokens` runs as several forward/backward passes (whole
    sequences each); every pass divides by the answer tokens of the whole batch, so the gradients add up
    to those of one pass.
    """

    def __init__(self, *args, stats: TrainStats, micro_batch_tokens: int | None = None,
                 per_sequence_attention: bool = True, compiled: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats = stats
        self.micro_batch_tokens = micro_batch_tokens
        self.per_sequence_attention = per_sequence_attention
        self.compiled = compiled  # decoder layers compiled (`compile_layers`): they run so within training steps
        # compute_loss takes `num_items_in_batch` whatever the model's forward accepts: have the Trainer count the
        # answer tokens of the whole accumulated batch for every model class. The loss then counts as scaled for
        # gradient accumulation exactly when that count was given (the Trainer's own rule).
        self.model_accepts_loss_kwargs = True
        self.loss_scale = 1

    def training_step(self, model, inputs, num_items_in_batch=None):
        # the Trainer counts the answer tokens over every process (average_tokens_across_devices): each process's
        # loss is its share of the global mean, and DDP's gradient average then needs a factor of num_processes
        self.loss_scale = (self.accelerator.num_processes if num_items_in_batch is not None
                           and self.args.average_tokens_across_devices else 1)
        parts = split_packed(inputs, self.micro_batch_tokens)
        if len(parts) == 1:
            return self._attended_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:
            num_items_in_batch = answer_count(inputs)
        losses = []
        for i, part in enumerate(parts):  # gradients sync (multi-process) only after the last pass
            sync = contextlib.nullcontext() if i == len(parts) - 1 else self.accelerator.no_sync(model)
            with sync:
                losses.append(self._attended_step(model, part, num_items_in_batch))
        return torch.stack(losses).sum()

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        # an FSDP2-sharded model (`distributed.shard`) reduce-scatters its gradients after the last micro-batch only
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _attended_step(self, model, inputs, num_items_in_batch):
        # the backward pass too: gradient checkpointing recomputes the forward there, with the same attention
        attention = compiled_attention(model, inputs) if self.compiled else \
            packed_attention(model, inputs, self.per_sequence_attention)
        with attention:
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sources = inputs.pop(SOURCES_KEY, [])
        loss_sum, count, _ = answer_loss_sum(model, inputs, self.per_sequence_attention, accuracy=False)
        self.stats.tokens += real_tokens(inputs)
        denominator = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
        loss = loss_sum / denominator * self.loss_scale
        if not torch.isfinite(loss):
            raise LoraplexError(self._non_finite_message(float(loss.detach()), sources))
        return (loss, None) if return_outputs else loss

    def _non_finite_message(self, value: float, sources: list[str]) -> str:
        checkpoints = sorted((p for p in Path(self.args.output_dir).glob("checkpoint-*") if p.name[11:].isdecimal()),
                             key=lambda p: int(p.name[11:]))
        kept = f"the last checkpoint is kept: {checkpoints[-1]}" if checkpoints else "no checkpoint was saved yet"
        rows: dict[str, list[str]] = {}
        for source in sources:  # "data/zh.jsonl line 12" -> {"data/zh.jsonl": ["line 12", ...]}
            match = re.fullmatch(r"(.*) ((?:line|row) \d+)", source)
            file, where = match.groups() if match else (source, "")
            rows.setdefault(file, []).append(where)
        listed = "; ".join(f"{file} {', '.join(wheres)}".strip() for file, wheres in rows.items()) or "(unknown)"
        return (f"the loss became {value} at step {self.state.global_step + 1}; {kept}. Lower the learning rate "
                f"(train.lr) and train again, or check the data rows of this batch: {listed}")


class ProgressCallback(TrainerCallback):
    """One bar per adapter with the latest loss and real tokens per second."""

    def __init__(self, name: str, stats: TrainStats, enabled: bool):
        self.name, self.stats, self.enabled = name, stats, enabled
        self.bar = None
        self.last_loss: float | None = None
        self._step_started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=f"train {self.name}",
                        unit="step", disable=not self.enabled, dynamic_ncols=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.stats.seconds += time.perf_counter() - self._step_started
        self.bar.update(state.global_step - self.bar.n)
        speed = self.stats.tokens / max(self.stats.seconds, 1e-9)
        self.bar.set_postfix_str(f"loss {self._last_loss()} | {speed:,.0f} tok/s")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        tokens = sum_over_processes(self.stats.tokens)  # every process calls this
        if checkpoint.is_dir() and state.is_world_process_zero:
            TrainStats(tokens, self.stats.seconds).save(checkpoint)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()

    def _last_loss(self) -> str:
        return f"{self.last_loss:.4f}" if self.last_loss is not None else "-"


def training_arguments(spec: DatasetSpec, checkpoint_dir: Path, checkpoints: bool = True,
                       deepspeed: dict | None = None) -> TrainingArguments:
    """`checkpoints`: False for a sharded model, whose Trainer checkpoints could not be resumed from; `deepspeed`:
    the DeepSpeed configuration (`distributed.deepspeed_config`) to train with."""
    t = spec.train
    args = TrainingArguments(
        output_dir=str(checkpoint_dir), per_device_train_batch_size=per_process_batch(spec),
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1, warmup_steps=t.warmup_ratio, lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, logging_first_step=True, save_strategy="steps" if checkpoints else "no",
        save_steps=t.save_steps,
        save_total_limit=1, report_to=[], disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=not on_gpu() and deepspeed is None, deepspeed=deepspeed,
        ddp_find_unused_parameters=False,  # every LoRA weight is used
        # weights are already in their training dtype (bf16 where supported): no autocast on top
        bf16=False, fp16=False,
    )
    if deepspeed is not None and not on_gpu():
        count_deepspeed_processes_on_cpu()
    return args


def per_process_batch(spec: DatasetSpec) -> int:
    """`train.batch_size` is the batch of one optimizer micro-step over all processes: each takes its share, so a
    recipe trains the same steps on the same rows in one process or several."""
    processes = world_size()
    if spec.train.batch_size % processes:
        raise LoraplexError(f"datasets[{spec.name}].train.batch_size: {spec.train.batch_size} sequences do not split "
                            f"evenly over {processes} processes; use a multiple of {processes}")
    return spec.train.batch_size // processes


def use_compiled_layers(peft_model, spec: DatasetSpec) -> bool:
    """`train.compile`: compile the decoder layers (True) or train eagerly; `on` where it cannot apply warns why."""
    mode = spec.train.compile
    device = "cuda" if on_gpu() else "cpu"
    if mode == "off" or (mode == "auto" and not COMPILE_BY_DEFAULT[device]):
        return False
    blocker = compile_blocker(peft_model, spec.train.packing, spec.train.packed_attention == "per_sequence")
    if blocker is not None:
        if mode == "on":
            warnings.warn(f"datasets[{spec.name}].train.compile: on is not applied: {blocker}; training eagerly",
                          stacklevel=2)
        return False
    compile_layers(peft_model)
    return True


@dataclass
class WithSources:
    """A collator whose batches also list their rows' sources ("file line N"), for error messages."""

    collate: PackedCollator | PaddedCollator

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        batch[SOURCES_KEY] = [str(f.get("source", "?")) for f in features]
        return batch


def make_trainer(peft_model, spec: DatasetSpec, data: PreparedDataset, checkpoint_dir: Path,
                 progress: bool = True, stats: TrainStats | None = None,
                 deepspeed: dict | None = None) -> tuple[AdapterTrainer, TrainStats]:
    """`stats`: the counts to continue from (those of the checkpoint a resumed run starts at); `deepspeed`: train
    through DeepSpeed with this configuration (ZeRO-3 partitions `peft_model`: pass a copy)."""
    stats = stats or TrainStats()
    use_lora_dropout(peft_model)
    collator = PackedCollator() if spec.train.packing else PaddedCollator(peft_model.config.pad_token_id or 0)
    sharded = getattr(peft_model, "is_distributed_loading_by_transformers", False)  # distributed.shard
    args = training_arguments(spec, checkpoint_dir, checkpoints=not sharded and deepspeed is None,
                              deepspeed=deepspeed)
    trainer = AdapterTrainer(
        model=peft_model, args=args, train_dataset=data.train,
        optimizers=(loraplus_optimizer(peft_model, spec, args), None),  # None: the Trainer's own (no LoRA+)
        data_collator=WithSources(collator), callbacks=[ProgressCallback(spec.name, stats, progress)], stats=stats,
        # DeepSpeed's engine steps after every backward at an accumulation boundary: one pass per batch there
        micro_batch_tokens=micro_batch_tokens(spec) if deepspeed is None else None,
        per_sequence_attention=spec.train.packed_attention == "per_sequence",
        compiled=use_compiled_layers(peft_model, spec),
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; the progress bar shows them
    return trainer, stats
