"""Batches and the answer-only loss.

Padding-free packing: a batch of sequences becomes one row `[1, total_tokens]` whose position ids
restart at 0 for each sequence, so no compute is spent on padding and the linear layers see one large
matrix. With `sdpa` attention, transformers would turn such position ids into a dense block-diagonal
mask over the whole row: attention work grows with (Σ Tᵢ)² instead of Σ Tᵢ², and SDPA's masked path
is several times slower than its causal kernel on CPU (benchmarks/train_speed.py). `answer_loss_sum`
therefore runs SDPA's causal kernel on each sequence of a packed row (`packed_attention`);
flash-attention implementations handle packed rows themselves and are left alone. The padded collator
is kept for comparison (`train.packing: false`).

The loss runs the LM head only on positions that have a label (the prompt's positions have none), in
chunks: each chunk's logits and their gradient are computed and freed before the next, so the
`[answer_tokens, vocab]` logits never exist at once. It runs inside the head's own forward (`AnswerHead`), where
FSDP and DeepSpeed ZeRO-3, which gather a module's weights around its forward, hold the head's weight whole.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..data.render import IGNORE_INDEX

PACKED_SDPA = "loraplex_packed_sdpa"  # the attention implementation name registered with transformers


@dataclass(frozen=True)
class Kernels:
    """How the core computes what it computes; every choice gives the same loss and gradients (up to rounding).
    loraplex runs the defaults; a benchmark's ablation sets others for its process (`use_kernels`)."""

    # PyTorch's CPU flash-attention kernel runs short sequences faster in float32 than in bfloat16 (forward +
    # backward, 9 query / 3 key heads of 64, AVX512-BF16: 64 tokens 0.36 against 1.26 ms, 128: 1.1 against 2.0,
    # 256: equal, 512: 16 against 12-15 ms); below this length the attention of a bfloat16 model runs in float32
    float32_attention_below: int = 256
    head_chunk_elements: int = 2**24  # logits per LM-head chunk (64 MiB in float32)
    in_place_head_loss: bool = True  # _plain_head_chunk where it applies (False: autograd through F.cross_entropy)


KERNELS = Kernels()


def use_kernels(**choices) -> Kernels:
    """Replace some of this process's `Kernels` choices (`use_kernels(in_place_head_loss=False)`); returns the
    previous ones."""
    global KERNELS
    previous, KERNELS = KERNELS, replace(KERNELS, **choices)
    return previous


@dataclass
class PackedCollator:
    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, labels, positions = [], [], []
        for f in features:
            ids = list(f["input_ids"])
            lab = list(f["labels"])
            lab[0] = IGNORE_INDEX  # never predict a sequence's first token from the previous sequence
            input_ids += ids
            labels += lab
            positions += range(len(ids))
        return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


@dataclass
class PaddedCollator:
    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id)
        labels = torch.full((len(features), width), IGNORE_INDEX)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _starts(positions: torch.Tensor) -> list[int]:
    """Where each sequence starts in one row of position ids (restarting at 0); the row's start is one."""
    starts = (positions == 0).nonzero().flatten().tolist()
    return starts if starts and starts[0] == 0 else [0] + starts


def sequence_starts(batch: dict[str, torch.Tensor]) -> list[int] | None:
    """Where each sequence of a packed row `[1, T]` starts (None for padded or multi-row batches)."""
    positions = batch.get("position_ids")
    if positions is None or positions.shape[0] != 1 or "attention_mask" in batch:
        return None
    return _starts(positions[0])


def split_packed(batch: dict[str, torch.Tensor], max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
    """Cut a packed row into packed rows of at most `max_tokens` tokens each, keeping sequences whole.

    Summed over the parts, the answer-loss sums and their gradients equal those of the whole row (every
    sequence's first label is already masked), so the parts can run one forward/backward pass each.
    """
    starts = sequence_starts(batch)
    width = batch["input_ids"].shape[1]
    if max_tokens is None or starts is None or width <= max_tokens:
        return [batch]
    cuts, first = [], 0  # cuts: (first sequence, end sequence) index pairs
    ends = starts[1:] + [width]
    for i in range(len(starts)):
        if ends[i] - starts[first] > max_tokens and i > first:
            cuts.append((first, i))
            first = i
    cuts.append((first, len(starts)))
    bounds = starts + [width]
    # tensors are cut along the row; per-sequence lists (e.g. row sources) along with their sequences
    return [{k: v[:, bounds[a]:bounds[b]] if torch.is_tensor(v) else v[a:b] if isinstance(v, list) else v
             for k, v in batch.items()} for a, b in cuts]


def _packed_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """SDPA's causal kernel on each sequence of a packed row: q/k/v [1, heads, T, D] -> [1, T, heads, D]."""
    bounds = _starts(position_ids[0]) + [query.shape[2]]
    parts = [_causal_sdpa(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], **kwargs)
             for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], None


def attention_in_float32(query: torch.Tensor, length: int) -> bool:
    """Whether a sequence of `length` tokens attends in float32: bfloat16/float16 on a CPU, shorter than
    `Kernels.float32_attention_below`."""
    short = length < KERNELS.float32_attention_below
    return query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and short


def _causal_sdpa(module, query, key, value, **kwargs):
    """One sequence's causal attention -> [1, T, heads, D]; short bfloat16/float16 sequences on a CPU run in
    float32 (see `Kernels.float32_attention_below`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if attention_in_float32(query, query.shape[2]):
        out = sdpa_attention_forward(module, query.float(), key.float(), value.float(), None, **kwargs)[0]
        return out.to(dtype)
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)[0]


@contextmanager
def packed_attention(model, batch: dict[str, torch.Tensor], enabled: bool = True):
    """Within the block, a packed row attends per sequence instead of through a block-diagonal mask.

    Applies only to `sdpa` models and packed rows (no padding mask, no cache): of several sequences, or on a CPU
    of one (for `_causal_sdpa`'s float32 rule).
    """
    config = causal_lm(model).config
    starts = sequence_starts(batch) if enabled and config._attn_implementation == "sdpa" else None
    # one sequence needs no splitting, but on a CPU it still gets the float32 rule of _causal_sdpa
    if starts is None or (len(starts) < 2 and batch["input_ids"].device.type != "cpu"):
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, _packed_sdpa)  # no mask function: transformers builds no mask
    config._attn_implementation = PACKED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


@contextmanager
def final_hidden_states(lm):
    """Within the block, the decoder's last hidden states (after its final norm) are appended to the yielded list."""
    captured: list[torch.Tensor] = []
    handle = lm.base_model.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        yield captured
    finally:
        handle.remove()


def causal_lm(model):
    """The causal LM inside a DDP wrapper and/or a PeftModel (or the model itself)."""
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_loss_sum(model, batch: dict[str, torch.Tensor], per_sequence_attention: bool = True,
                    accuracy: bool = True) -> tuple[torch.Tensor, int, int]:
    """Sum of next-token cross-entropy over labelled positions, their count, and correct predictions (0 without
    `accuracy`: training skips the argmax over the vocabulary).

    The decoder runs on every token; the LM head only on positions whose next token has a label.
    """
    lm = causal_lm(model)
    head = answer_head(lm)  # before the forward: the model's own call of the head then runs through it too
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with packed_attention(lm, batch, per_sequence_attention), final_hidden_states(lm) as captured:
        # through the model's own forward (a DDP wrapper syncs gradients only for a forward it ran), with the
        # LM head on no position (an empty index; an int 1 would still multiply by the whole head): the decoder's
        # output [B, T, H] goes to the head below, answer positions only
        no_rows = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
        model(**inputs, use_cache=False, logits_to_keep=no_rows)
    hidden = captured[0]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    picked = hidden[:, :-1][keep]  # [N, H]
    wanted = targets[keep]
    rules = logit_rules(lm.config)
    if isinstance(head, AnswerHead) and not any(p.requires_grad for p in head.parameters()):
        loss, correct = head(picked, wanted, accuracy, rules)
    else:  # a trained (or wrapped) head needs autograd's weight gradient
        loss, correct = _head_loss(head, rules, picked, wanted)
    return loss, int(keep.sum()), int(correct)


def logit_rules(config) -> tuple[float | None, float | None]:
    """(divisor of the logits, soft cap) of a model's config: e.g. Granite divides its logits, Gemma 2 caps them."""
    return getattr(config, "logits_scaling", None), getattr(config, "final_logit_softcapping", None)


class AnswerHead(torch.nn.Linear):
    """A frozen linear LM head that also computes the answer loss in its forward: `head(hidden [N, H], wanted [N],
    accuracy, rules)` -> (cross-entropy sum, correct predictions), in row chunks (`_ChunkedHeadLoss`). Called with
    hidden states alone it is the plain linear layer the model's own forward calls."""

    def forward(self, hidden: torch.Tensor, wanted: torch.Tensor | None = None, accuracy: bool = True,
                rules: tuple[float | None, float | None] = (None, None)):
        if wanted is None:
            return super().forward(hidden)
        return _ChunkedHeadLoss.apply(hidden, wanted, self.weight, self.bias, rules, accuracy)


def answer_head(lm) -> torch.nn.Module:
    """The LM head of `lm`; a plain `nn.Linear` head becomes an `AnswerHead` in place (same weights, same output).
    Done before FSDP wraps the head, since FSDP gives the module a class of its own."""
    head = lm.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        head.__class__ = AnswerHead
    return head


def answer_count(batch: dict[str, torch.Tensor]) -> int:
    """Labelled next-token positions of a batch: the denominator of its mean answer loss."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def backward_answer_loss(model, batch: dict[str, torch.Tensor], answers: int, max_tokens: int | None, device) -> float:
    """Backward of the answer-loss sum of `batch` divided by `answers`, in passes of at most `max_tokens` tokens
    (`split_packed`), each attending per sequence in its backward too (gradient checkpointing recomputes the
    forward there); returns the loss sum."""
    total = 0.0
    for part in split_packed(batch, max_tokens):
        part = {k: v.to(device) for k, v in part.items()}
        with packed_attention(model, part):
            loss, _, _ = answer_loss_sum(model, part, accuracy=False)
            (loss / max(answers, 1)).backward()
        total += float(loss.detach())
    return total


def _head_loss(head, rules: tuple, hidden: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy sum and correct predictions of hidden states [N, H] against targets [N]; `head` maps [N, H] to
    logits [N, V], `rules` = `logit_rules`."""
    logits = head(hidden).float()  # [N, V]
    scaling, cap = rules
    if scaling:
        logits = logits / scaling
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, wanted, reduction="sum"), (logits.argmax(-1) == wanted).sum()


class _ChunkedHeadLoss(torch.autograd.Function):
    """`_head_loss` over row chunks for a frozen head (weight [V, H], bias): the gradient w.r.t. the hidden states
    is computed chunk by chunk in the forward pass and kept ([N, H]), so no chunk's logits outlive the chunk.
    Without logit scaling or soft-capping the cross-entropy and its gradient (softmax - one-hot) are computed in
    place on the chunk's float32 logits (`_plain_head_chunk`) instead of through autograd."""

    @staticmethod
    def forward(ctx, hidden, wanted, weight, bias, rules, accuracy):
        rows = max(1, KERNELS.head_chunk_elements // weight.shape[0])
        plain = KERNELS.in_place_head_loss and not any(rules)
        need_grad = ctx.needs_input_grad[0]
        loss, correct, grads = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.long), []
        for start in range(0, hidden.shape[0], rows):
            chunk, targets = hidden[start:start + rows].detach(), wanted[start:start + rows]
            if plain:
                part, right, grad = _plain_head_chunk(weight, bias, chunk, targets, need_grad, accuracy)
            else:
                chunk.requires_grad_(need_grad)
                with torch.enable_grad():
                    part, right = _head_loss(lambda h: F.linear(h, weight, bias), rules, chunk, targets)
                grad = torch.autograd.grad(part, chunk)[0] if need_grad else None
            if grad is not None:
                grads.append(grad)
            loss, correct = loss + part.detach(), correct + right
        if need_grad:
            ctx.save_for_backward(torch.cat(grads) if grads else torch.zeros_like(hidden))
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None, None


def _plain_head_chunk(weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor, wanted: torch.Tensor,
                      need_grad: bool, accuracy: bool):
    """Cross-entropy sum, correct predictions (0 unless `accuracy`) and the gradient w.r.t. `hidden` (or None)
    of one chunk: logsumexp and softmax share one exp pass over the float32 logits, in place."""
    logits = F.linear(hidden, weight, bias).float()  # [n, V]
    correct = (logits.argmax(-1) == wanted).sum() if accuracy else hidden.new_zeros((), dtype=torch.long)
    top = logits.amax(-1, keepdim=True)
    picked = logits.gather(1, wanted[:, None])
    probs = logits.sub_(top).exp_()  # exp(logit - max)
    total = probs.sum(-1, keepdim=True)
    loss = (top + total.log() - picked).sum()
    if not need_grad:
        return loss, correct, None
    probs.div_(total)  # softmax
    probs[torch.arange(len(wanted), device=wanted.device), wanted] -= 1
    return loss, correct, probs.to(hidden.dtype) @ weight


@torch.no_grad()
def heldout_metrics(model, dataset, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean loss over every answer token of `dataset` (rows with input_ids, labels)."""
    if dataset is None or len(dataset) == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "token_accuracy": float("nan"), "tokens": 0}
    was_training = model.training
    model.eval()
    collate = PackedCollator()
    device = next(model.parameters()).device
    total, count, correct = 0.0, 0, 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        loss, n, right = answer_loss_sum(model, batch)
        total, count, correct = total + float(loss), count + n, correct + right
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "token_accuracy": correct / max(count, 1),
            "tokens": count}
