"""Stage 1 of `target_modules: auto`: what the first optimizer step of each candidate's LoRA would gain.

On a few training batches the base (no adapter) runs forward and backward; for every linear module the
gradient of the mean answer loss with respect to its weight, M = Σ_tokens ∂L/∂y · xᵀ ([out, in]), is summed from
the module's input and output gradient (so a 4-bit base works too).

A LoRA starts at B = 0 with A random (PEFT: uniform in ±1/√in), so only B has a gradient, s·M·Aᵀ ([out, r],
s = the scaling). Adam's first step moves every entry of B by the learning rate η against the sign of its
gradient, which lowers the loss, to first order, by η·s·‖M·Aᵀ‖₁ (the sum of the absolute entries). Over A's
initialisation each entry |Mᵢ·aⱼ| has a mean proportional to ‖Mᵢ‖/√in, so the expected gain is proportional to
η·s·r·Σᵢ ‖Mᵢ‖/√in: the rank times the weight gradient's row norms, summed over the set's modules and layers. At
one parameter budget (and one scaling: `auto` keeps alpha/r) this favours the modules whose gradient is largest
per parameter the LoRA spends on them.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from ..targets import Candidate, linear_modules
from ..lm.packed import PackedCollator, answer_count, backward_answer_loss


@contextmanager
def _weight_gradients(model, names: dict[str, torch.nn.Module]):
    """Within the block, backward passes add each named module's weight gradient (float32) into the yielded dict."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def watch(name):
        def forward_hook(module, args, out):
            if not (torch.is_grad_enabled() and out.requires_grad):  # e.g. the no-grad pass of reentrant checkpointing
                return
            x = args[0].detach()

            def on_grad(grad):
                part = grad.reshape(-1, grad.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                if name in sums:
                    sums[name].add_(part)
                else:
                    sums[name] = part
            out.register_hook(on_grad)
        return forward_hook

    for name, module in names.items():
        handles.append(module.register_forward_hook(watch(name)))
    # no base weight needs a gradient; the embeddings' output does, so every activation after it gets one
    embeddings = model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def probe(model, rows: list[dict], batch_size: int, micro_batch_tokens: int | None,
          layers: list[int] | None = None) -> dict:
    """Per linear module type, Σ over `layers` (default: all; the candidates' `layers_to_transform`) of
    Σᵢ ‖Mᵢ‖/√in on `rows` (in batches of `batch_size`).

    Returns {"row_norms": {leaf: value}, "tokens", "seconds"}.
    """
    started = time.perf_counter()
    names = linear_modules(model, layers)
    collate = PackedCollator()
    batches = [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    answers = sum(answer_count(b) for b in batches)  # the gradient of the mean answer loss over all batches
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the gradient of the base as it is
    with _weight_gradients(model, names) as sums:
        for batch in batches:
            backward_answer_loss(model, batch, answers, micro_batch_tokens, device)
    model.train(was_training)
    tokens = sum(b["input_ids"].numel() for b in batches)
    row_norms: dict[str, float] = {}
    for name, matrix in sums.items():
        leaf = name.rsplit(".", 1)[-1]
        value = float(matrix.double().norm(dim=1).sum()) / math.sqrt(matrix.shape[1])
        row_norms[leaf] = row_norms.get(leaf, 0.0) + value
    return {"row_norms": row_norms, "tokens": tokens, "seconds": time.perf_counter() - started}


def score(row_norms: dict[str, float], candidate: Candidate, rank: int) -> float:
    """The expected first-order loss decrease of the first Adam step of a rank-`rank` LoRA on `candidate`
    (in units of the learning rate times the scaling)."""
    return rank * sum(row_norms.get(m, 0.0) for m in candidate.modules)
