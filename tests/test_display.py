"""The prepare and train tables: readable at 80 columns; no `nan` where there is no held-out split."""
from __future__ import annotations

import io
import math

from rich.console import Console

from loraplex.display import prepare_table, train_table

STATS = [
    {"name": "alpaca_zh", "format": "alpaca", "rows": 48818, "bad_rows": 3, "train": 43936, "val": 4879,
     "total_tokens": 12_345_678, "answer_tokens": 6_543_210, "length_p50": 212, "length_p90": 512, "length_p99": 1020,
     "length_max": 4096, "truncated": 120, "dropped": 4, "max_seq_length": 1024, "recommended_max_seq_length": 1088},
    {"name": "en", "format": "messages", "rows": 6, "bad_rows": 0, "train": 6, "val": 0, "total_tokens": 300,
     "answer_tokens": 60, "length_p50": 50, "length_p90": 52, "length_p99": 52, "length_max": 52, "truncated": 0,
     "dropped": 0, "max_seq_length": 128, "recommended_max_seq_length": 64},
]


def adapter(heldout: tuple[float, float], targets) -> dict:
    return {"config": {"target_modules": targets, "lora": {"r": 16, "alpha": 32}},
            "train_loss_curve": [{"loss": 2.3456}, {"loss": 1.2345}], "trainable_params": 6_815_744,
            "total_params": 8_036_077_568, "heldout_loss_base": heldout[0], "heldout_loss": heldout[1],
            "tokens_per_s": 12345.6, "wall_time_s": 3723.2}


ADAPTERS = {"alpaca_zh": adapter((2.1, 1.3), ["q_proj", "k_proj", "v_proj", "o_proj"]),
            "en": adapter((math.nan, math.nan), "all-linear")}


def render(table, width: int = 80) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_prepare_table_is_readable_at_80_columns():
    text = render(prepare_table(STATS))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text  # no header or number cut short
    for header in ("dataset", "format", "rows (bad)", "train/val", "tokens", "(answer)", "p50/p90/p99/max",
                   "max_seq_length", "→ recommended", "trunc/drop"):
        assert header in text, header
    for cell in ("alpaca_zh", "alpaca", "48818 (3)", "43936/4879", "12,345,678", "(6,543,210)", "212/512/1020/4096",
                 "1024", "→ 1088", "120/4", "6 (0)", "6/0", "128", "→ 64", "0/0"):
        assert cell in text, cell


def test_train_table_is_readable_at_80_columns():
    text = render(train_table(ADAPTERS))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for header in ("dataset", "target modules", "r/alpha", "trainable", "(% of base)", "train loss", "first → last",
                   "held-out loss", "base → adapter", "tok/s", "wall"):
        assert header in text, header
    for cell in ("alpaca_zh", "16/32", "6.82M", "(0.085%)", "2.346 → 1.234", "2.100 → 1.300", "12,346", "3723s",
                 "all-linear"):
        assert cell in text, cell


def test_no_heldout_split_prints_a_dash_and_says_why():
    text = render(train_table(ADAPTERS))
    assert "nan" not in text.lower()
    en_row = next(line for line in text.splitlines() if line.startswith("│ en "))
    assert "–" in en_row
    assert " ".join(text.split()).count("no held-out split for en") == 1
    # with every adapter measured there is nothing to explain
    assert "no held-out split" not in render(train_table({"alpaca_zh": ADAPTERS["alpaca_zh"]}))
