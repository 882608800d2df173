"""The models a server answers with, and the one worker thread that generates for every request.

The run's base is loaded once with every adapter of the run attached (PEFT); a request names an adapter, the base,
or a merged model folder. Requests wait in a small queue; the worker takes up to `max_batch_size` of them that run
on the same model (all adapters and the base share one) and decodes them together in one forward pass per token,
each row with its own adapter (PEFT's `adapter_names`, "__base__" for the base), its own sampling settings and its
own stopping point. A request's events (text deltas, then the end) reach its caller through `Job.emit`.
"""
from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..adapters import load
from ..data.render import chat_template_for, prompt_text
from ..device import pick_dtype, to_accelerator
from ..errors import LoraplexError
from ..models import load_model, load_tokenizer, resolve_base, stop_token_ids
from ..routing import BASE
from ..run import adapter_dir, adapter_metadata, complete_adapters, open_run

PEFT_BASE = "__base__"  # the base's name in PEFT's adapter_names


@dataclass
class ModelEntry:
    """One name a request can ask for."""

    id: str
    kind: str  # base | adapter | merged
    group: str  # which loaded model runs it: "run" (base + adapters) or the merged folder's name
    tokenizer: object
    template: str  # the chat template its prompts are rendered with
    adapter: str | None = None  # PEFT adapter name; None for the base and merged models
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"id": self.id, "object": "model", "created": 0, "owned_by": "loraplex",
                "loraplex": {"kind": self.kind, **self.info}}


@dataclass
class Job:
    """One request: token ids in, events out through `emit` (called on the worker thread)."""

    entry: ModelEntry
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[dict], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: bool = False
    finished: bool = False  # its "done" event was sent


class Busy(LoraplexError):
    """The request queue is full."""


def _adapter_info(name: str, folder: Path) -> dict:
    meta = adapter_metadata(folder)
    config = meta.get("config") or {}
    lora = config.get("lora") or {}
    return {"dataset": name, "dataset_files": meta.get("dataset_files"),
            "target_modules": config.get("target_modules"), "r": lora.get("r"), "alpha": lora.get("alpha"),
            "heldout_loss": meta.get("heldout_loss"), "base_model": meta.get("base_model"),
            "path": str(folder)}


class Engine:
    """The loaded models and the generation worker."""

    def __init__(self, run_dir: str | Path, merged: tuple | list = (), max_batch_size: int = 8,
                 max_queue: int = 64, batch_wait_s: float = 0.005):
        run_dir = Path(run_dir)
        self.workspace = ws = open_run(run_dir)
        names = complete_adapters(run_dir)
        if not names:
            raise LoraplexError(f"{run_dir} holds no trained adapter; run `loraplex train` first")
        if BASE in names:
            raise LoraplexError(f"{run_dir} has an adapter named '{BASE}', the name the server gives the base model; "
                                "rename the dataset")
        merged_refs = [resolve_base(str(Path(m).resolve())) for m in merged]  # a bad folder fails before loading
        self.dirs = {name: adapter_dir(run_dir, name) for name in names}
        self.adapters = load(ws.base, self.dirs, dtype=ws.recipe.model.dtype)
        to_accelerator(self.adapters.model).eval()
        self.adapters.use(names[0])  # adapter layers on: each row then picks its own through adapter_names
        tokenizer = self.adapters.tokenizer
        specs = {spec.name: spec for spec in ws.recipe.datasets}
        self.models = {"run": self.adapters.model}
        self.entries: dict[str, ModelEntry] = {
            BASE: ModelEntry(BASE, "base", "run", tokenizer, chat_template_for(tokenizer), None,
                             {"base_model": ws.base.name, "path": ws.base.location})}
        for name in names:
            spec = specs.get(name)
            self.entries[name] = ModelEntry(name, "adapter", "run", tokenizer,
                                            chat_template_for(tokenizer, spec.template if spec else None), name,
                                            _adapter_info(name, self.dirs[name]))
        for ref in merged_refs:
            label = f"merged:{Path(ref.location).name}"
            if label in self.entries:
                raise LoraplexError(f"two --merged folders are both named {Path(ref.location).name}; rename one")
            self.models[label] = to_accelerator(load_model(ref, pick_dtype(ws.recipe.model.dtype))).eval()
            merged_tokenizer = load_tokenizer(ref)
            self.entries[label] = ModelEntry(label, "merged", label, merged_tokenizer,
                                             chat_template_for(merged_tokenizer), None,
                                             {"path": ref.location, "base_model": ws.base.name})
        # PEFT cannot mix DoRA adapters in one batch: such runs batch only requests for one adapter at a time
        self.mixed = not any(getattr(cfg, "use_dora", False) for cfg in self.adapters.model.peft_config.values())
        self.max_batch_size, self.max_queue, self.batch_wait_s = max(1, max_batch_size), max_queue, batch_wait_s
        self.stats = {"batches": 0, "largest_batch": 0, "requests": 0, "joined": 0}  # joined: a running batch
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self.model_lock = threading.Lock()  # one forward pass at a time on the run's model (the router uses it too)
        self._closing = False
        self._worker = threading.Thread(target=self._work, name="loraplex-serve", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ requests

    def context_length(self, entry: ModelEntry) -> int:
        config = self.models[entry.group].config
        return int(getattr(config, "max_position_embeddings", None) or 2048)

    def chat_prompt(self, entry: ModelEntry, messages: list[dict]) -> str:
        return prompt_text(entry.tokenizer, messages, entry.template)

    def encode(self, entry: ModelEntry, text: str) -> list[int]:
        return entry.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise Busy("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise Busy(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self._pending.append(job)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout=10)

    # ------------------------------------------------------------------ the worker

    def _group_key(self, job: Job) -> str:
        return job.entry.group if self.mixed or job.entry.group != "run" else f"run:{job.entry.adapter}"

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
        if self.max_batch_size > 1 and self.batch_wait_s > 0:
            time.sleep(self.batch_wait_s)  # let requests sent together arrive together
        with self._cond:
            first = self._pending.popleft()
            batch, key, kept = [first], self._group_key(first), deque()
            while self._pending:
                job = self._pending.popleft()
                (batch if self._group_key(job) == key and len(batch) < self.max_batch_size else kept).append(job)
            self._pending.extendleft(reversed(kept))
        return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [job for job in batch if not job.cancelled]
            if not batch:
                continue
            self.stats["batches"] += 1
            self.stats["requests"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            with self.model_lock:
                self._generate(batch)

    def _take_more(self, key: str, room: int) -> list[Job]:
        """Waiting requests that can join the running batch (same model), while the queue's head is one of them:
        a request for another model is never overtaken."""
        joined: list[Job] = []
        with self._cond:
            while room > len(joined) and self._pending and self._group_key(self._pending[0]) == key:
                job = self._pending.popleft()
                if not job.cancelled:
                    joined.append(job)
        if joined:
            self.stats["requests"] += len(joined)
            self.stats["joined"] += len(joined)
        return joined

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        """Decode `jobs` together, one forward pass per token. A row leaves the batch when its request ends, and
        waiting requests for the same model join between steps (their prompts prefilled, the key-value caches
        left-padded to one length), so the batch stays full while requests keep coming."""
        entry = jobs[0].entry
        model, key = self.models[entry.group], self._group_key(jobs[0])
        batch = _Batch(model, entry.tokenizer, entry.group == "run" and self.mixed)
        if entry.group == "run" and not self.mixed:
            self.adapters.use(entry.adapter)
        try:
            batch.join(jobs)
            while batch.rows:
                batch.accept()
                batch.step()
                more = self._take_more(key, self.max_batch_size - len(batch.rows)) if batch.rows else []
                if more:
                    batch.join(more)
                    self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch.rows))
        except Exception as exc:  # noqa: BLE001  (the server keeps serving; every caller in the batch gets the error)
            for job in batch.jobs:
                if not job.finished:
                    job.emit({"type": "error", "message": f"generation failed: {type(exc).__name__}: {exc}"})
        finally:
            if not self.mixed:
                self.adapters.use(self.adapters.names[0])


class _Batch:
    """The rows being decoded together: their key-value cache [rows, heads, length, dim], attention mask and
    positions, and each row's next-token logits."""

    def __init__(self, model, tokenizer, mixed: bool):
        self.model, self.tokenizer, self.mixed = model, tokenizer, mixed
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos = stop_token_ids(model, tokenizer)
        self.cache_arg = _cache_argument(model)
        self.rows: list[_Row] = []
        self.jobs: list[Job] = []  # every request that joined, for errors
        self.cache = self.mask = self.positions = self.logits = None

    def _extra(self, rows: list[_Row]) -> dict:
        return {"adapter_names": [row.job.entry.adapter or PEFT_BASE for row in rows]} if self.mixed else {}

    def join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` (left-padded among themselves) and add them to the batch."""
        from transformers import DynamicCache

        self.jobs += jobs
        rows = [_Row(job, self.tokenizer, self.eos) for job in jobs]
        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.tensor([[self.pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{self.cache_arg: DynamicCache()}, **self._extra(rows))
        cache, logits = getattr(out, self.cache_arg), out.logits[:, -1, :].float()
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.logits = rows, cache, mask, positions[:, -1:], logits
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):  # both end at their rows' latest token
            old.keys = torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)])
            old.values = torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)])
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(mask, length)])
        self.positions = torch.cat([self.positions, positions[:, -1:]])
        self.logits = torch.cat([self.logits, logits])
        self.rows += rows

    def accept(self) -> None:
        """Every row takes its next token; the rows whose request ended leave the batch."""
        for i, row in enumerate(self.rows):
            row.accept(_pick(self.logits[i], row.job, row.generator))
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]

    def step(self) -> None:
        """One forward pass over every row's latest token."""
        if not self.rows:
            return
        tokens = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions + 1
        out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: self.cache}, **self._extra(self.rows))
        self.cache, self.logits = getattr(out, self.cache_arg), out.logits[:, -1, :].float()


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros before `tensor` along its sequence dimension (-2 for keys/values [B, H, T, D], -1 for a mask [B, T])."""
    dim = -2 if tensor.dim() == 4 else -1
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _cache_argument(model) -> str:
    """The name of the key-value cache argument: `cache` in recent transformers, `past_key_values` before."""
    import inspect

    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _pick(logits: torch.Tensor, job: Job, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else a sample from the top-p nucleus of softmax(logits / temperature)."""
    if job.temperature <= 0 or generator is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / job.temperature, dim=-1)
    if job.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < job.top_p  # the first token always stays
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class _Row:
    """One request's decoding state: its tokens, the text sent so far, stop strings, the end."""

    def __init__(self, job: Job, tokenizer, eos: set[int]):
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        self.tokens: list[int] = []
        self.sent, self.done = "", False
        self.generator = None
        if job.temperature > 0:
            self.generator = torch.Generator().manual_seed(job.seed if job.seed is not None
                                                           else random.SystemRandom().randrange(2 ** 63))
        self.holdback = max((len(s) for s in job.stop), default=1) - 1

    def accept(self, token: int) -> None:
        self.tokens.append(token)
        if self.job.cancelled:
            return self.finish("cancelled")
        if token in self.eos:
            return self.finish("stop")
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s, max(0, len(self.sent) - self.holdback)) for s in self.job.stop) if i >= 0]
        if cuts:
            return self.finish("stop", text[:min(cuts)])
        if len(self.tokens) >= self.job.max_tokens:
            return self.finish("length", text)
        ready = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence waits for its next byte
        ready = ready[:len(ready) - self.holdback] if self.holdback else ready  # it may start a stop string
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            self.job.emit({"type": "delta", "text": ready[len(self.sent):]})
            self.sent = ready

    def finish(self, reason: str, text: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        if text is None:
            text = self.tokenizer.decode([t for t in self.tokens if t not in self.eos], skip_special_tokens=True)
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.job.emit({"type": "delta", "text": text[len(self.sent):]})
        self.job.finished = True
        self.job.emit({"type": "done", "finish_reason": reason, "text": text,
                       "usage": {"prompt_tokens": len(self.job.prompt_ids), "completion_tokens": len(self.tokens),
                                 "total_tokens": len(self.job.prompt_ids) + len(self.tokens)}})
