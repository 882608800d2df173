"""The rows `target_modules: auto` decides on: a selection split carved from the training rows.

The held-out split grades the adapter; a decision scored on it would be graded on the rows that chose it. So
the trials are scored on `auto.selection_rows` training rows (the ones whose token ids hash lowest: the same
rows whatever their order in the file, and identical rows on the same side), and the probe and the trials
train on the rest. The full training still trains on every training row; no decision reads the held-out split.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass
class SelectionSplit:
    fit: "datasets.Dataset"  # noqa: F821 - the training rows the probe and the trials train on
    score: "datasets.Dataset | None"  # noqa: F821 - the training rows the trials are scored on (None: no trials)


def row_hash(input_ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, input_ids)).encode()).hexdigest()


def selection_split(train, rows: int, min_fit_rows: int) -> SelectionSplit | None:
    """`rows` rows of `train` to score trials on (more when the last one has identical copies), the rest to fit;
    None when fewer than `min_fit_rows` would be left to fit on."""
    hashes = [row_hash(ids) for ids in train["input_ids"]]
    order = sorted(range(len(train)), key=lambda i: hashes[i])
    cut = min(rows, len(order))
    while 0 < cut < len(order) and hashes[order[cut]] == hashes[order[cut - 1]]:
        cut += 1  # a copy of a scored row must not be trained on
    if len(order) - cut < min_fit_rows:
        return None
    scored = set(order[:cut])
    fit = [i for i in range(len(train)) if i not in scored]
    return SelectionSplit(train.select(fit), train.select(sorted(scored)))
