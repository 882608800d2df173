"""The demo's summary as the CLI prints it: base vs adapter per dataset, and whether the demo's targets were met."""
from __future__ import annotations

from rich.table import Table

from .command import targets_met


def demo_table(summary: dict) -> Table:
    table = Table(title="demo: base vs adapter on each dataset's own held-out and test data", title_justify="left")
    for col in ("dataset", "target modules", "held-out loss base → adapter (merged)",
                "exact match base → adapter (merged)", "loss -30% / EM +20pt"):
        table.add_column(col, justify="left" if col in ("dataset", "target modules") else "right")
    for row in summary["results"]:
        targets = row["target_modules"] if isinstance(row["target_modules"], str) else ",".join(row["target_modules"])
        targets = f"auto: {targets}" if row.get("auto") else targets
        marks = " / ".join("[green]yes[/]" if ok else "[red]no[/]" for ok in targets_met(row).values())
        merged_loss = _merged_loss(row)
        merged_em = f" ({row['exact_match_merged']:.0%})" if row["exact_match_merged"] is not None else ""
        table.add_row(row["dataset"], targets,
                      f"{row['heldout_loss_base']:.3f} → {row['heldout_loss_adapter']:.3f}{merged_loss}",
                      f"{_percent(row['exact_match_base'])} → {_percent(row['exact_match_adapter'])}{merged_em}", marks)
    return table


def timing_table(summary: dict) -> Table:
    """Where the demo's time went (`time_breakdown`), seconds and share of the total."""
    table = Table(title="demo: where the time went", title_justify="left")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    total = next(row["seconds"] for row in summary["timings"] if row["phase"] == "total")
    for row in summary["timings"]:
        table.add_row(row["phase"], f"{row['seconds']:.1f}", f"{row['seconds'] / max(total, 1e-9):.0%}")
    return table


def _merged_loss(row: dict) -> str:
    """" (merged)", or for a merge scored on the rows its weight search never read, the adapter's loss there too."""
    if row["heldout_loss_merged"] is None:
        return ""
    if row.get("heldout_loss_adapter_same_rows") is None:
        return f" ({row['heldout_loss_merged']:.3f})"
    return (f" ({row['heldout_loss_merged']:.3f}; adapter {row['heldout_loss_adapter_same_rows']:.3f} on the same "
            f"{row['heldout_rows_merged']} unsearched rows)")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"
