"""`loraplex merge`: adapters of a run merged into their base, written as a standalone model, verified.

W' = W + Σᵢ wᵢ·scalingᵢ·Bᵢ@Aᵢ, scaling = lora_alpha/r (lora_alpha/√r with rsLoRA), computed in float32 on
a fresh full-precision load of the pristine base (the cached base folder is only read). Adapters trained on a
4-bit base (QLoRA) merge here too, never into quantized weights, and the report says so. Adapters on
disjoint modules add exactly; on a shared module the weighted sum is still exact (it is what PEFT's `cat`
computes), while PEFT's `linear`/`ties`/`dare_linear` combine the A's and the B's separately (cross terms
Bᵢ@Aⱼ, pruning) and are not. DoRA adapters go through PEFT's `merge_and_unload`
(W' = m·(W + ΔW)/‖W + ΔW‖ per row), and only on modules no other adapter touches, since DoRA's row norms
do not add.

Every merge is verified and the numbers saved in `merge_report.json`: the saved weights against the
formula, the saved model's logits against base+adapters (PEFT, all adapters active at once), and per
adapter how much of its held-out loss improvement the merged model keeps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_dir
from ..device import to_accelerator
from ..models import BaseModelRef, load_model
from ..records import MergeRecord, write_record
from ..run import MERGE_REPORT, adapter_dir, weights_hash, writer_lock
from ..tracking import log_merge
from .apply import merged_tokenizer, write_merged, reference_model
from .plan import (SEARCH, MergeMethod, MergePlan, claim_out_dir, interference, interference_lines, plan_merge,
                   precision_note, quantized_adapters)
from .search import halves, search_weights
from .verify import heldout_report, probe_ids, verify

__all__ = ["MergePlan", "merge", "plan_merge"]


def merge(run_dir: str | Path, adapters: list[str], weights: list[float] | None = None,
          method: MergeMethod | str = MergeMethod.AUTO, *, out_dir: str | Path,
          dtype: torch.dtype | str = torch.float32, density: float = 0.5, seed: int = 0, overwrite: bool = False,
          echo: Callable[[str], None] | None = None) -> MergeRecord:
    """Merge `adapters` (names in RUN/adapters) into the base; write `out_dir`, verify, return the report (the
    record merge_report.json holds).

    `echo` receives the interference report and the method's exactness before the merge starts.
    """
    echo = echo or (lambda line: None)
    plan = plan_merge(run_dir, adapters, weights, method, dtype, density)
    out_dir = claim_out_dir(Path(out_dir), plan, overwrite)
    with writer_lock(run_dir, [f"merge-{out_dir.name}"], "loraplex merge"):
        return _merge(plan, out_dir, seed, echo)


def _merge(plan: MergePlan, out_dir: Path, seed: int, echo: Callable[[str], None]) -> MergeRecord:
    pairs = interference(plan)
    precision = precision_note(plan)
    for line in interference_lines(plan, pairs) + [plan.note] + ([precision] if precision else []):
        echo(line)
    reference = reference_model(plan, seed)
    search = report_rows = None
    if plan.requested == SEARCH:
        search_rows, report_rows = halves(plan)
        echo(f"searching one weight per adapter on {sum(len(r) for r in search_rows.values())} held-out rows "
             f"(the other {sum(len(r) for r in report_rows.values())} are kept for the report)")
        search = search_weights(plan, reference, search_rows)
        echo("weights found: " + ", ".join(f"{n} {w:g}" for n, w in plan.weights.items()))
    tokenizer, template, template_note = merged_tokenizer(plan)
    with atomic_dir(out_dir) as tmp:
        write_merged(plan, reference, tokenizer, tmp)
        merged = to_accelerator(load_model(BaseModelRef(str(tmp), out_dir.name), torch.float32))
        report = verify(plan, reference, merged, probe_ids(tokenizer, template), tmp)
        report.update(method_note=plan.note, interference=pairs, notes=[template_note] if template_note else [],
                      out_dir=str(out_dir), base_precision="full", precision_note=precision,
                      trained_on_quantized_base=quantized_adapters(plan))
        report["heldout"] = heldout_report(plan, reference, merged, report_rows)
        if search:
            report["weights_search"] = search
        for entry in report["adapters"]:  # what the merge used: a retrained adapter makes it stale
            entry["weights_sha256"] = weights_hash(adapter_dir(plan.run_dir, entry["name"]))
        record = MergeRecord.model_validate(report)
        write_record(tmp / MERGE_REPORT, record)
    log_merge(plan.run_dir, out_dir.name, report)
    return record
