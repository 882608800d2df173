"""Rich tables printed by the CLI."""
from __future__ import annotations

from rich.table import Table


def prepare_table(stats: list[dict]) -> Table:
    table = Table(title="datasets (lengths in tokens)", title_justify="left")
    for col in ("dataset", "rows (bad)", "train/val", "tokens (answer)", "p50/p90/p99/max", "trunc/drop",
                "max_seq_length → rec."):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for s in stats:
        table.add_row(f"{s['name']} [dim]{s['format']}[/]", f"{s['rows']} ({s['bad_rows']})",
                      f"{s['train']}/{s['val']}", f"{s['total_tokens']:,} ({s['answer_tokens']:,})",
                      f"{s['length_p50']}/{s['length_p90']}/{s['length_p99']}/{s['length_max']}",
                      f"{s['truncated']}/{s['dropped']}", f"{s['max_seq_length']} → {s['recommended_max_seq_length']}")
    return table
