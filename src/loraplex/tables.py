"""Rich tables printed by the CLI."""
from __future__ import annotations

from rich.markup import escape
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


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def percent_of_base(meta: dict) -> float:
    """Trainable parameters as a percentage of the base model's own (total minus the adapter's)."""
    return 100 * meta["trainable_params"] / max(meta["total_params"] - meta["trainable_params"], 1)


def train_table(adapters: dict[str, dict]) -> Table:
    table = Table(title="adapters", title_justify="left")
    for col in ("dataset", "target modules", "r/alpha", "trainable (% of base)", "train loss first → last",
                "held-out loss base → adapter", "tok/s", "wall"):
        table.add_column(col, justify="left" if col in ("dataset", "target modules") else "right")
    for name, m in adapters.items():
        cfg = m["config"]
        targets = cfg["target_modules"] if isinstance(cfg["target_modules"], str) else ",".join(cfg["target_modules"])
        curve = m["train_loss_curve"]
        losses = f"{curve[0]['loss']:.3f} → {curve[-1]['loss']:.3f}" if curve else "-"
        table.add_row(name, targets, f"{cfg['lora']['r']}/{cfg['lora']['alpha']:g}",
                      f"{_count(m['trainable_params'])} ({percent_of_base(m):.3f}%)", losses,
                      f"{m['heldout_loss_base']:.3f} → {m['heldout_loss']:.3f}", f"{m['tokens_per_s']:,.0f}",
                      f"{m['wall_time_s']:.0f}s")
    return table


def demo_table(summary: dict) -> Table:
    from .demo import targets_met

    table = Table(title="demo: base vs adapter on each dataset's own held-out and test data", title_justify="left")
    for col in ("dataset", "target modules", "held-out loss base → adapter (merged)",
                "exact match base → adapter (merged)", "loss -30% / EM +20pt"):
        table.add_column(col, justify="left" if col in ("dataset", "target modules") else "right")
    for row in summary["results"]:
        targets = row["target_modules"] if isinstance(row["target_modules"], str) else ",".join(row["target_modules"])
        marks = " / ".join("[green]yes[/]" if ok else "[red]no[/]" for ok in targets_met(row).values())
        merged_loss = f" ({row['heldout_loss_merged']:.3f})" if row["heldout_loss_merged"] is not None else ""
        merged_em = f" ({row['exact_match_merged']:.0%})" if row["exact_match_merged"] is not None else ""
        table.add_row(row["dataset"], targets,
                      f"{row['heldout_loss_base']:.3f} → {row['heldout_loss_adapter']:.3f}{merged_loss}",
                      f"{_percent(row['exact_match_base'])} → {_percent(row['exact_match_adapter'])}{merged_em}", marks)
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def eval_table(result: dict) -> Table:
    """The eval matrix: a row per model, a column per dataset; the diagonal (an adapter on its own data) bold."""
    table = Table(title=f"eval: held-out loss (token accuracy); exact match, chrF on test prompts — run "
                        f"{result['run']}", title_justify="left")
    table.add_column("model \\ data")
    for col in result["columns"]:
        table.add_column(escape(col["name"]), justify="right")
    for row in result["rows"]:
        cells = []
        for col in result["columns"]:
            m = result["metrics"][row["name"]][col["name"]]
            text = "-" if m["loss"] is None else f"{m['loss']:.3f} ({m['token_accuracy']:.0%})"
            if m.get("exact_match") is not None:
                text += f"\nEM {m['exact_match']:.0%} chrF {m['chrf']:.1f}"
            cells.append(f"[bold]{text}[/]" if row.get("dataset") == col["name"] else text)
        label = escape(row["name"]) if row["kind"] != "base" else f"[dim]{escape(row['name'])}[/]"
        table.add_row(label, *cells)
    return table
