"""The models a server answers with, and the one worker thread that generates for every request.

The run's base is loaded once with every adapter of the run attached (PEFT); a request names an adapter, the base,
or a merged model folder. Requests wait in a small queue; the worker takes up to `max_batch_size` of them that run
on the same model (all adapters and the base share one) and decodes them together in one forward pass per token,
each row with its own adapter (PEFT's `adapter_names`, "__base__" for the base), its own sampling settings and its
own stopping point (`batch`). A request's events (text deltas, then the end or an error) reach its caller through
`Job.emit`. Between decoding steps the worker also runs the router's forward passes (`call_on_worker`); it is the
only thread that touches the models.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapters import load
from ..data.render import chat_template_for, end_of_turn_ids, prompt_text
from ..device import to_accelerator
from ..errors import LoraplexError, ParameterError
from ..models import load_model, load_tokenizer, resolve_base, stop_token_ids
from ..routing import BASE
from ..run import adapter_dir, adapter_metadata, complete_adapters, open_run
from ..lm.decoding import Batch, row_error

log = logging.getLogger("loraplex.serving")
WORKER_STOPPED = "the generation worker has stopped (the server's log says why); restart the server"


@dataclass
class ModelEntry:
    """One name a request can ask for."""

    id: str
    kind: str  # base | adapter | merged
    group: str  # which loaded model runs it: "run" (base + adapters) or the merged folder's name
    tokenizer: object
    template: str  # the chat template its prompts are rendered with
    adapter: str | None = None  # PEFT adapter name; None for the base and merged models
    info: dict = field(default_factory=dict)  # names and run-relative facts only: /v1/models shows it
    stop_ids: set[int] = field(default_factory=set)  # the end-of-turn token its template ends answers with
    system: str | None = None  # the dataset's system prompt, for conversations that bring none (as in training)

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


class WorkerStopped(Busy):
    """The generation worker is gone: no request can be answered."""


def public_name(value) -> str | None:
    """A model's name as /v1/models may show it: a hub id as it is, a local path by its last part."""
    return Path(value).name if isinstance(value, str) and Path(value).is_absolute() else value


def _adapter_info(name: str, folder: Path) -> dict:
    meta = adapter_metadata(folder)
    config = meta.get("config") or {}
    lora = config.get("lora") or {}
    files = meta.get("dataset_files") or []
    return {"dataset": name, "dataset_files": [Path(str(f)).name for f in files],
            "target_modules": config.get("target_modules"), "r": lora.get("r"), "alpha": lora.get("alpha"),
            "heldout_loss": meta.get("heldout_loss"), "base_model": public_name(meta.get("base_model")),
            "adapter": f"adapters/{folder.name}"}


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
        self.adapters = load(ws.base, self.dirs, dtype=ws.dtype)
        to_accelerator(self.adapters.model).eval()
        self.adapters.use(names[0])  # adapter layers on: each row then picks its own through adapter_names
        self.models = {"run": self.adapters.model}
        self.entries = self._run_entries(names)
        for ref in merged_refs:
            label = f"merged:{Path(ref.location).name}"
            if label in self.entries:
                raise ParameterError("merged", f"two folders are both named {Path(ref.location).name}; rename one")
            self.models[label] = to_accelerator(load_model(ref, ws.dtype)).eval()
            tokenizer = load_tokenizer(ref)
            template = chat_template_for(tokenizer)
            self.entries[label] = ModelEntry(label, "merged", label, tokenizer, template, None,
                                             {"base_model": public_name(ws.base.name)},
                                             end_of_turn_ids(tokenizer, template))
        # PEFT cannot mix DoRA adapters in one batch: such runs batch only requests for one adapter at a time
        self.mixed = not any(getattr(cfg, "use_dora", False) for cfg in self.adapters.model.peft_config.values())
        self.max_batch_size, self.max_queue, self.batch_wait_s = max(1, max_batch_size), max_queue, batch_wait_s
        self.stats = {"batches": 0, "largest_batch": 0, "requests": 0, "joined": 0,  # joined: a running batch
                      "cancelled": 0}
        self._pending: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # work for the model between steps
        self._running: list[Job] = []  # the requests of the batch being decoded (to tell them if it fails)
        self._cond = threading.Condition()
        self._closing = False
        self.failure: str | None = None  # why the worker stopped, if it did
        self._worker = threading.Thread(target=self._work, name="loraplex-serve", daemon=True)
        self._worker.start()

    def _run_entries(self, names: list[str]) -> dict[str, ModelEntry]:
        """The base and one entry per adapter, each with its template, end-of-turn token and system prompt."""
        ws, tokenizer = self.workspace, self.adapters.tokenizer
        specs = {spec.name: spec for spec in ws.recipe.datasets}
        template = chat_template_for(tokenizer)
        entries = {BASE: ModelEntry(BASE, "base", "run", tokenizer, template, None,
                                    {"base_model": public_name(ws.base.name)}, end_of_turn_ids(tokenizer, template))}
        for name in names:
            spec = specs.get(name)
            template = chat_template_for(tokenizer, spec.template if spec else None)
            entries[name] = ModelEntry(name, "adapter", "run", tokenizer, template, name,
                                       _adapter_info(name, self.dirs[name]), end_of_turn_ids(tokenizer, template),
                                       spec.system if spec else None)
        return entries

    # ------------------------------------------------------------------ requests

    @property
    def alive(self) -> bool:
        return self.failure is None and self._worker.is_alive()

    def context_length(self, entry: ModelEntry) -> int:
        config = self.models[entry.group].config
        return int(getattr(config, "max_position_embeddings", None) or 2048)

    def chat_prompt(self, entry: ModelEntry, messages: list[dict]) -> str:
        """The prompt `entry` answers: its dataset's system prompt first when the conversation brings none, as
        the adapter saw its training rows."""
        if entry.system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": entry.system}, *messages]
        return prompt_text(entry.tokenizer, messages, entry.template)

    def encode(self, entry: ModelEntry, text: str) -> list[int]:
        return entry.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self.alive:
                raise WorkerStopped(WORKER_STOPPED)
            if self._closing:
                raise Busy("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise Busy(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self._pending.append(job)
            self._cond.notify()

    def call_on_worker(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker thread, between two decoding steps (the router's forward passes share the
        model with the batch, and never wait for the batch to end)."""
        future: Future = Future()
        with self._cond:
            if not self.alive:
                raise WorkerStopped(WORKER_STOPPED)
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout=10)

    # ------------------------------------------------------------------ the worker

    def _group_key(self, job: Job) -> str:
        return job.entry.group if self.mixed or job.entry.group != "run" else f"run:{job.entry.adapter}"

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:  # noqa: BLE001  (the caller gets it)
                    future.set_exception(exc)

    def _next_batch(self) -> list[Job] | None:
        while True:
            self._run_calls()
            with self._cond:
                if self._closing:
                    return None
                if self._pending:
                    break
                if not self._calls:
                    self._cond.wait()
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
        """The worker's loop. A failure inside a batch ends that batch's requests; anything that escapes ends
        the worker loudly: /health fails and every waiting request gets a 503 at once."""
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                batch = self._live(batch)
                if not batch:
                    continue
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
                self._running = batch
                try:
                    self._generate(batch)
                except Exception as exc:  # noqa: BLE001  (those requests fail; the worker goes on)
                    for job in self._running:
                        row_error(job, exc, "the batch")
                self._running = []  # not on a BaseException: `_stop` tells these requests
        except BaseException as exc:
            self._stop(exc)
            raise

    def _stop(self, exc: BaseException) -> None:
        log.critical("the generation worker stopped: %s: %s", type(exc).__name__, exc, exc_info=exc)
        with self._cond:
            self.failure = f"{type(exc).__name__}: {exc}"
            waiting, calls = [*self._running, *self._pending], list(self._calls)
            self._pending.clear()
            self._calls.clear()
        for job in waiting:
            if not job.finished:
                job.finished = True
                job.emit({"type": "error", "status": 503, "message": WORKER_STOPPED})
        for _, future in calls:
            future.set_exception(WorkerStopped(WORKER_STOPPED))

    def _take_more(self, key: str, room: int) -> list[Job]:
        """Waiting requests that can join the running batch (same model), while the queue's head is one of them:
        a request for another model is never overtaken."""
        joined: list[Job] = []
        with self._cond:
            while room > len(joined) and self._pending and self._group_key(self._pending[0]) == key:
                joined += self._live([self._pending.popleft()])
        if joined:
            self.stats["requests"] += len(joined)
            self.stats["joined"] += len(joined)
        # a new list of the live ones: a batch that runs as long as traffic lasts must not keep every request
        self._running = [job for job in self._running if not job.finished] + joined
        return joined

    def _cancelled(self) -> None:
        self.stats["cancelled"] += 1

    def _live(self, jobs: list[Job]) -> list[Job]:
        """`jobs` less those whose client went away while they waited (counted as cancelled)."""
        live = [job for job in jobs if not job.cancelled]
        self.stats["cancelled"] += len(jobs) - len(live)
        return live

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        """Decode `jobs` together, one forward pass per token. A row leaves the batch when its request ends, and
        waiting requests for the same model join between steps (their prompts prefilled, the key-value caches
        left-padded to one length), so the batch stays full while requests keep coming. Between steps the worker
        also runs the router's embeddings."""
        entry = jobs[0].entry
        model, key = self.models[entry.group], self._group_key(jobs[0])
        if entry.group == "run" and not self.mixed:
            self.adapters.use(entry.adapter)
        try:
            batch = Batch(model, entry.tokenizer, entry.group == "run" and self.mixed,
                          stop_token_ids(model, entry.tokenizer), self._cancelled)
            batch.join(jobs)
            while batch.rows:
                batch.accept()
                try:
                    batch.step()
                except Exception as exc:  # noqa: BLE001  (a failed forward pass ends its rows, not the worker)
                    batch.fail(exc)
                self._run_calls()
                more = self._take_more(key, self.max_batch_size - len(batch.rows)) if batch.rows else []
                if more:
                    batch.join(more)
                    self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch.rows))
        finally:
            if not self.mixed:
                self.adapters.use(self.adapters.names[0])
