"""The rows of one continuous batch: their shared key-value cache, and each row's sampling, stop strings and text.

`loraplex serve` decodes its requests here (`serving.engine`), and the eval matrix its greedy answers
(`greedy_answers`): every model of a run in mixed-adapter batches, each row with its own adapter.
A row's failure (its sampling, its decoding, its caller) ends that row with an error; the other rows go on. The
cache keeps only the columns some live row still attends to, so its length is bounded by the longest live row,
however long the batch has been running.
"""
from __future__ import annotations

import logging
import random
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

PEFT_BASE = "__base__"  # the base's name in PEFT's adapter_names
log = logging.getLogger("loraplex.serving")


def row_error(job, exc: BaseException, where: str) -> None:
    """End `job` with an internal error: its caller is told an id, the log gets the detail under that id."""
    ident = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s (%s): %s: %s", ident, where, job.entry.id, type(exc).__name__, exc,
              exc_info=exc)
    if not job.finished:
        job.finished = True
        job.emit({"type": "error", "status": 500, "message": f"generation failed (log id {ident})"})


class Batch:
    """The rows being decoded together: their key-value cache [rows, heads, length, dim], attention mask and
    positions, and each row's next-token logits."""

    def __init__(self, model, tokenizer, mixed: bool, eos: set[int], on_cancel: Callable[[], None] = lambda: None):
        self.model, self.tokenizer, self.mixed, self.eos = model, tokenizer, mixed, eos
        self.on_cancel = on_cancel
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cache_arg = _cache_argument(model)
        self.rows: list[Row] = []
        self.cache = self.mask = self.positions = self.logits = None

    def _extra(self, rows: list[Row]) -> dict:
        return {"adapter_names": [row.job.entry.adapter or PEFT_BASE for row in rows]} if self.mixed else {}

    def join(self, jobs: list) -> None:
        """Prefill `jobs` (left-padded among themselves) and add them to the batch; a job whose row cannot be set
        up (its sampler, say) ends with an error alone."""
        from transformers import DynamicCache

        rows = []
        for job in jobs:
            try:
                rows.append(Row(job, self.tokenizer, self.eos | job.entry.stop_ids, self.on_cancel))
            except Exception as exc:  # noqa: BLE001  (that request fails; the others join)
                row_error(job, exc, "joining the batch")
        if not rows:
            return
        prompts = [row.job.prompt_ids for row in rows]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # the last position as an index, not `logits_to_keep=1`: the LM head then reads a gathered [rows, 1, hidden]
        # copy; on the strided slice of several rows a bfloat16 CPU matmul copies its weight per row (~100x slower)
        last = torch.tensor([width - 1], device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=last, **{self.cache_arg: DynamicCache()}, **self._extra(rows))
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

    def fail(self, exc: BaseException) -> None:
        """The forward pass itself failed: every row of the batch ends with the error."""
        for row in self.rows:
            row.done = True
            row_error(row.job, exc, "the batch's forward pass")
        self.rows = []

    def accept(self) -> None:
        """Every row takes its next token; the rows whose request ended (or failed) leave the batch."""
        for i, row in enumerate(self.rows):
            try:
                row.accept(pick(self.logits[i], row.job, row.generator))
            except Exception as exc:  # noqa: BLE001  (that request fails; the batch goes on)
                row.done = True
                row_error(row.job, exc, "decoding")
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        self._drop_unused_columns()

    def _drop_unused_columns(self) -> None:
        """Cut the leading cache and mask columns that no live row attends to (padding left by rows that left)."""
        if not self.rows:
            return
        live = self.mask.any(dim=0).nonzero()
        first = int(live[0]) if len(live) else self.mask.shape[1]
        if first == 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:].contiguous(), layer.values[:, :, first:].contiguous()
        self.mask = self.mask[:, first:].contiguous()

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


def pick(logits: torch.Tensor, job, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else a sample from the top-p nucleus of softmax(logits / temperature)."""
    if job.temperature <= 0 or generator is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / job.temperature, dim=-1)
    if job.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < job.top_p  # the first token always stays
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def complete_text(text: str) -> str:
    """`text` without a trailing U+FFFD: the decoding of a character whose last UTF-8 bytes are not there yet."""
    return text.rstrip("\ufffd")


class Row:
    """One request's decoding state: its tokens, the text sent so far, stop strings, the end.

    The text sent is always a prefix of the final text: the last `holdback` characters (a stop string may be
    starting there) and an incomplete character wait until the next token says what they are.
    """

    def __init__(self, job, tokenizer, eos: set[int], on_cancel: Callable[[], None] = lambda: None):
        self.job, self.tokenizer, self.eos, self.on_cancel = job, tokenizer, eos, on_cancel
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
            self.on_cancel()
            return self.finish("cancelled")
        if token in self.eos:
            return self.finish("stop")
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s, max(0, len(self.sent) - self.holdback)) for s in self.job.stop) if i >= 0]
        if cuts:
            return self.finish("stop", text[:min(cuts)])
        if len(self.tokens) >= self.job.max_tokens:
            return self.finish("length", text)
        ready = complete_text(text)
        ready = ready[:max(0, len(ready) - self.holdback)]  # the tail may start a stop string
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            self.job.emit({"type": "delta", "text": ready[len(self.sent):]})
            self.sent = ready

    def finish(self, reason: str, text: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        if text is None:
            text = self.tokenizer.decode([t for t in self.tokens if t not in self.eos], skip_special_tokens=True)
        if reason == "length":  # its last character may lack bytes it will never get
            text = complete_text(text)
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.job.emit({"type": "delta", "text": text[len(self.sent):]})
        self.job.finished = True
        self.job.emit({"type": "done", "finish_reason": reason, "text": text,
                       "usage": {"prompt_tokens": len(self.job.prompt_ids), "completion_tokens": len(self.tokens),
                                 "total_tokens": len(self.job.prompt_ids) + len(self.tokens)}})


@dataclass
class Target:
    """What a row decodes with: its PEFT adapter (None: the base) and the tokens that end its answer."""

    id: str
    adapter: str | None = None
    stop_ids: set[int] = field(default_factory=set)


@dataclass
class GreedyJob:
    """One prompt to answer greedily, for `greedy_answers` (the fields a `Row` reads of a server's request)."""

    entry: Target
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: bool = False
    finished: bool = False
    text: str | None = None
    error: str | None = None

    def emit(self, event: dict) -> None:
        if event["type"] == "done":
            self.text = event["text"]
        elif event["type"] == "error":
            self.error = event["message"]


@torch.no_grad()
def greedy_answers(model, tokenizer, jobs: list[GreedyJob], eos: set[int], max_batch_size: int = 32,
                   mixed: bool = True) -> list[str]:
    """Every job's greedy answer (stripped), decoded in continuous batches of at most `max_batch_size` rows: a row
    leaves when it ends and waiting jobs join between steps. `mixed`: rows pick their adapter (PEFT's
    `adapter_names`); else the model runs as it is for every row. A row that fails raises at the end."""
    was_training = model.training
    model.eval()
    waiting = deque(jobs)
    batch = Batch(model, tokenizer, mixed, eos)
    refill = max(1, max_batch_size // 4)  # join in groups: each join is a prefill pass and a copy of the cache
    try:
        while waiting or batch.rows:
            room = max_batch_size - len(batch.rows)
            if waiting and (room >= min(refill, len(waiting)) or not batch.rows):
                batch.join([waiting.popleft() for _ in range(min(room, len(waiting)))])
            batch.accept()
            batch.step()
    finally:
        model.train(was_training)
    failed = [job.error for job in jobs if job.error is not None or job.text is None]
    if failed:
        raise RuntimeError(f"greedy decoding failed for {len(failed)} prompt(s): {failed[0]}")
    return [job.text.strip() for job in jobs]
