"""Everything the CLI prints as rich tables and text: prepare, train, eval, inspect and merge (the demo prints its
own table, `loraplex.demo.table`)."""
from __future__ import annotations

import math

from rich.columns import Columns
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .lora_settings import adapter_variant
from .run import MERGE_REPORT, count_text, percent_of_base
from .selection import trial_losses



def prepare_table(stats: list[dict]) -> Table:
    """One row per dataset; related numbers share a column, one per line, so the table fits 80 columns."""
    table = Table(title="datasets (lengths in tokens)", title_justify="left")
    table.add_column("dataset\nformat", overflow="fold")
    for col in ("rows (bad)\ntrain/val", "tokens\n(answer)", "length\np50/p90/p99/max",
                "max_seq_length\n→ recommended\ntrunc/drop"):
        table.add_column(col, justify="right", overflow="fold")
    elsewhere = [s["name"] for s in stats if s.get("held_out_elsewhere")]
    if elsewhere:
        table.caption = ("*: rows not trained on because another dataset of the recipe holds them out of the same "
                         "file")
    for s in stats:
        split = f"{s['train']}/{s['val']}" + (f"\n(*{s['held_out_elsewhere']})" if s.get("held_out_elsewhere") else "")
        table.add_row(f"{s['name']}\n[dim]{s['format']}[/]", f"{s['rows']} ({s['bad_rows']})\n{split}",
                      f"{s['total_tokens']:,}\n({s['answer_tokens']:,})",
                      f"{s['length_p50']}/{s['length_p90']}/{s['length_p99']}/{s['length_max']}",
                      f"{s['max_seq_length']}\n→ {s['recommended_max_seq_length']}\n{s['truncated']}/{s['dropped']}")
    return table


def train_table(adapters: dict[str, dict], steps: list | None = None) -> Table:
    """One row per adapter; fits 80 columns. Without a held-out split the held-out loss is '–' (not NaN).

    `steps` (`training.plan.Step`s): what this `train` did with each adapter, shown under its name."""
    actions = {step.name: step.action for step in steps or []}
    table = Table(title="adapters", title_justify="left", caption_justify="left")
    table.add_column("dataset\ntarget modules", overflow="fold")
    for col in ("r/alpha\ntrainable\n(% of base)", "train loss\nfirst → last", "held-out loss\nbase → adapter",
                "tok/s\nwall"):
        table.add_column(col, justify="right", overflow="fold")
    unmeasured = []
    for name, m in adapters.items():
        cfg = m["config"]
        targets = cfg["target_modules"] if isinstance(cfg["target_modules"], str) else ", ".join(cfg["target_modules"])
        targets += " (auto)" if "selection" in m else ""
        curve = m["train_loss_curve"]
        losses = f"{curve[0]['loss']:.3f} → {curve[-1]['loss']:.3f}" if curve else "–"
        heldout = (m.get("heldout_loss_base"), m.get("heldout_loss"))
        if any(x is None or math.isnan(x) for x in heldout):
            unmeasured.append(name)
            heldout_text = "–"
        else:
            heldout_text = f"{heldout[0]:.3f} → {heldout[1]:.3f}"
        action = f"\n[italic]{escape(actions[name])}[/]" if name in actions else ""
        table.add_row(f"{name}\n[dim]{targets}[/]{action}",
                      f"{cfg['lora']['r']}/{cfg['lora']['alpha']:g}\n{count_text(m['trainable_params'])}\n"
                      f"({percent_of_base(m):.3f}%){_variant_line(m)}", losses, heldout_text,
                      f"{m['tokens_per_s']:,.0f}\n{m['wall_time_s']:.0f}s")
    if unmeasured:
        table.caption = (f"–: no held-out split for {', '.join(unmeasured)}, so no held-out loss (set val_size > 0 "
                         "or val_path to measure it)")
    return table


def _variant_line(meta: dict) -> str:
    """The adapter's LoRA variant, under its rank, when it is not plain LoRA."""
    variant = adapter_variant(meta)
    return "" if variant == "LoRA" else f"\n[dim]{escape(variant)}[/]"


def select_table(name: str, decision: dict) -> Table:
    """`target_modules: auto` for one dataset: every candidate at the budget, its probe score and trial losses."""
    trials = decision["trials"]
    rounds = ", ".join(f"{alive} to step {stop}" for stop, alive in trials["rounds"]) or "none"
    if trials["rounds"] and "batch_size" in trials:  # records of an earlier version may not say
        rounds += f", batches of {trials['batch_size']} rows"
    table = Table(title=f"{name}: modules at a budget of {count_text(decision['budget'])} trainable parameters",
                  title_justify="left", caption_justify="left")
    for col in ("modules", "r", "params", "probe\nscore", "trial loss on the\nselection rows per round"):
        table.add_column(col, justify="left" if col == "modules" else "right", overflow="fold")
    for c in decision["candidates"]:
        trial = c["trial"]
        losses = " → ".join(f"{x:.3f}" for x in trial_losses(trial)) if trial else "–"
        label = f"[bold]{c['label']} ✓[/]" if c["label"] == decision["winner"] else c["label"]
        table.add_row(label, str(c["rank"]), count_text(c["params"]), f"{c['probe_score']:.3g}", losses)
    spent = f"{decision['seconds']:.0f}s" + (" earlier (cached)" if decision.get("cached") else "")
    full = decision.get("full_training_s")
    table.caption = (f"chosen: {decision['winner']}, r={decision['r']}, alpha={decision['alpha']:g} (decided by "
                     f"{decision['decided_by']}; trial rounds: {rounds}); selection {spent}"
                     + (f"; {decision['rows']['note']}" if "rows" in decision else "")
                     + (f", full training {full:.0f}s ({decision['seconds'] / full:.0%})" if full else ""))
    return table


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
            if m.get("heldout_rows"):  # a searched merge: the rows its search never read
                text += f" *{m['heldout_examples']} rows"
            if m.get("exact_match") is not None:
                text += f"\nEM {m['exact_match']:.0%} chrF {m['chrf']:.1f}"
            cells.append(f"[bold]{text}[/]" if row.get("dataset") == col["name"] else text)
        label = escape(row["name"]) if row["kind"] != "base" else f"[dim]{escape(row['name'])}[/]"
        table.add_row(label, *cells)
    routing = (result.get("routing") or {}).get("datasets", {})
    if routing:
        table.add_row("auto: routed to its\ndataset's adapter",
                      *(_routed(routing.get(col["name"])) for col in result["columns"]))
    if any(cell.get("heldout_rows") for cells in result["metrics"].values() for cell in cells.values()):
        table.caption = ("*: a merge whose weights were searched on the even held-out rows, scored on the odd ones "
                         "only (its merge_report.json has the base and the adapter on those rows)")
    return table


def _routed(cell: dict | None) -> str:
    if not cell or cell["accuracy"] is None:
        return "-"
    return f"{cell['accuracy']:.0%} of {cell['prompts']}"


# --------------------------------------------------------------------------- inspect


def render_inspect(report: dict) -> list:
    """Rich renderables for `loraplex inspect`: a header, the module table, the values when present."""
    targets = report["target_modules"]
    head = Text("\n".join([
        f"adapter {report['name']}  ({report['adapter_dir']})",
        f"base model: {report['base_model']}  ({report['base_model_location']})",
        f"target modules: {targets if isinstance(targets, str) else ', '.join(targets)}",
        f"r={report['r']}  lora_alpha={report['lora_alpha']:g}  rsLoRA={'yes' if report['use_rslora'] else 'no'}  "
        f"DoRA={'yes' if report['use_dora'] else 'no'}  scaling = {report['scaling_formula']}",
        f"variant: {report.get('variant', 'LoRA')}",
        f"merge: {report['merge_formula']}",
        f"trainable parameters: {report['trainable_params']:,}",
    ] + ([f"warning: {report['base_fingerprint_warning']}"] if report["base_fingerprint_warning"] else [])
      + ([f"not LoRA A/B (ignored here): {', '.join(report['other_tensors'])}"] if report["other_tensors"] else [])))
    per_module = len({m["scaling"] for m in report["modules"]}) > 1  # alpha_pattern / rank_pattern
    scaling = "scaling" if per_module else f"{report['scaling']:.6g}"
    table = Table(title=f"per layer × module: Frobenius norms, ΔW = {scaling}·B@A", title_justify="left")
    for col in ("layer", "module", "A", "B", "‖A‖", "‖B‖") + (("scaling",) if per_module else ()) + (
            "‖ΔW‖", "‖W‖", "‖ΔW‖/‖W‖"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in report["modules"]:
        table.add_row("-" if m["layer"] is None else str(m["layer"]), m["module"], "×".join(map(str, m["A_shape"])),
                      "×".join(map(str, m["B_shape"])), f"{m['A_norm']:.4g}", f"{m['B_norm']:.4g}",
                      *([f"{m['scaling']:.4g}"] if per_module else []), f"{m['delta_norm']:.4g}",
                      f"{m['W_norm']:.4g}", f"{m['relative_delta_norm']:.2e}")
    out = [head, table]
    if "values" in report:
        out += _values_tables(report["values"])
    return out


def _values_tables(values: dict) -> list:
    s = values["scaling"]
    titles = {"W": "W (base)", "A": "A", "B": "B", "BA": "B@A (unscaled)",
              "delta": f"ΔW = W' − W (DoRA, s={s:.6g})" if values["dora"] else f"ΔW = {s:.6g}·B@A",
              "merged": "W' (DoRA)" if values["dora"] else f"W + ΔW = W + {s:.6g}·B@A"}
    tables = []
    for key, title in titles.items():
        table = Table(title=title, show_header=False)
        rows = values[key]
        for _ in range(len(rows[0]) if rows else 0):
            table.add_column(justify="right")
        for row in rows:
            table.add_row(*(f"{v: .3e}" for v in row))
        tables.append(table)
    corner = values["corner"]
    return [Text(f"values of {values['name']}, top-left {corner}×{corner} corner:"), Columns(tables)]


# --------------------------------------------------------------------------- merge


def render_merge(report: dict) -> list:
    """Rich renderables for `loraplex merge`: adapters, verification, held-out loss kept."""
    adapters = Table(title=f"merged adapters (method {report['method_requested']} → {report['method']}, "
                     f"{'exact' if report['exact'] else 'NOT an exact sum'})", title_justify="left")
    for col in ("adapter", "target modules", "r", "alpha", "rsLoRA/DoRA", "scaling", "weight"):
        adapters.add_column(col, justify="left" if col in ("adapter", "target modules") else "right")
    for a in report["adapters"]:
        targets = a["target_modules"] if isinstance(a["target_modules"], str) else ",".join(a["target_modules"])
        adapters.add_row(a["name"], targets, str(a["r"]), f"{a['lora_alpha']:g}",
                         f"{'yes' if a['use_rslora'] else 'no'}/{'yes' if a['use_dora'] else 'no'}",
                         a["scaling_formula"], f"{a['weight']:g}")
    w, lg = report["verification"]["weights"], report["verification"]["logits"]
    lines = report["notes"] + [
        f"weights: max |W' − ({w['reference']})| = {w['max_abs_diff']:.3e} over {len(w['modules'])} modules, "
        f"{w['max_relative']:.3e} of max|W| (tolerance {w['tolerance_relative']:g} of max(|W|, |W'|)); other weights "
        "unchanged",
        f"logits on {lg['prompts']} prompts: max |merged − {lg['reference']}| = {lg['max_abs_diff']:.3e} "
        f"(tolerance {lg['tolerance']:.3e})",
    ]
    if not report["exact"]:
        deviation = max(e.get("exact_sum_relative_deviation", 0.0) for e in w["modules"].values())
        lines.append(f"deviation from the exact sum W + Σ wᵢ·scalingᵢ·Bᵢ@Aᵢ: {deviation:.3e} of max|W|")
    search = report.get("weights_search")
    if search and search.get("note"):
        lines.append(f"weights search: {search['note']}")
    elif search:
        worst = search["worst_retention_search"]
        searched = sum(search['search_rows'].values())
        lines.append(f"weights searched on {searched} held-out rows ({search['evaluations']} "
                     f"weightings tried): the adapter that keeps least keeps {worst['found']:.0%} there (at weights 1: "
                     f"{worst['at_weights_1']:.0%}); the table below is on the other rows")
    out = [adapters, Text("\n".join(lines))]
    out += _heldout_table(report["heldout"])
    out.append(Text(f"merged model: {report['out_dir']} (report in {MERGE_REPORT}; loads with "
                    "AutoModelForCausalLM.from_pretrained, no peft needed)"))
    return out


def _heldout_table(heldout: dict) -> list:
    if heldout.get("skipped"):
        return [Text(f"held-out loss not measured: {heldout['skipped']}")]
    table = Table(title=f"held-out loss on each adapter's own data (flag: merged keeps < {heldout['threshold']:.0%} "
                  "of the adapter's improvement)", title_justify="left")
    for col in ("dataset", "base", "adapter", "merged", "improvement kept"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    skipped = []
    for name, row in heldout["datasets"].items():
        if "skipped" in row:
            skipped.append(f"{name}: held-out loss not measured: {row['skipped']}")
            continue
        kept = "n/a (no improvement)" if row["kept"] is None else f"{row['kept']:.0%}"
        if row["below_threshold"]:
            kept = f"[bold red]{kept} < {heldout['threshold']:.0%}[/]"
        table.add_row(name, f"{row['base']:.4f}", f"{row['adapter']:.4f}", f"{row['merged']:.4f}", kept)
    return ([table] if table.row_count else []) + [Text(line) for line in skipped]
