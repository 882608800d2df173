"""The report's sections on choices the run made or measured: `target_modules: auto` (every candidate's probe
score and trial losses) and one model for all datasets (merged models against their adapters)."""
from __future__ import annotations

from pathlib import Path

from ..records import MergeRecord, RecordError, read_record
from ..run import MERGE_REPORT, count_text
from ..select import trial_losses
from .blocks import Plot, RunData, Section, Table, ascii_label, figure, num, png


def selection_section(data: RunData) -> Section | None:
    """`target_modules: auto`: per adapter, every candidate's probe score and trial losses, and a plot."""
    blocks: list[Table | Plot] = []
    for name, meta in data.adapters.items():
        decision = meta.get("selection")
        if not decision:
            continue
        rows = [[c["label"] + (" (chosen)" if c["label"] == decision["winner"] else ""), str(c["rank"]),
                 count_text(c["params"]), f"{c['probe_score']:.4g}",
                 " → ".join(f"{x:.3f}" for x in trial_losses(c["trial"])) if c["trial"] else "-"]
                for c in decision["candidates"]]
        full = decision.get("full_training_s")
        cost = f"; selection {decision['seconds']:.0f}s" + (f" = {decision['seconds'] / full:.0%} of the full "
                                                              f"training ({full:.0f}s)" if full else "")
        rows_note = f"; {decision['rows']['note']}" if "rows" in decision else ""
        rows_note += "".join(f"; {d['label']} left out: {d['reason']}" for d in decision.get("dropped", []))
        blocks.append(Table(["modules", "r", "params", "probe score", "trial loss on the selection rows per round"],
                            rows,
                            "selection", {(i, 0) for i, c in enumerate(decision["candidates"])
                                          if c["label"] == decision["winner"]},
                            caption=f"{name}: budget {count_text(decision['budget'])} parameters; decided by "
                                    f"{decision['decided_by']}{cost}"
                                    f"{' (cached decision)' if decision.get('cached') else ''}"
                                    f"{rows_note}"))
        blocks.append(_selection_plot(name, decision))
    if not blocks:
        return None
    text = ("`target_modules: auto` gives every candidate module set the same number of trainable parameters "
            "(its rank is set to match), scores each with a gradient probe on a few training batches (the expected "
            "loss decrease of the first Adam step of its LoRA: its rank times the row norms of the loss gradient of "
            "its weights), and trains the probe's best set, its best set of several modules, the references "
            "q_proj+v_proj and all-linear and the probe's next sets in short trials (on smaller batches when the "
            "recipe's do not fit), keeping the better half by loss on the selection rows after each round: "
            "`auto.selection_rows` training rows the trials do not train on. No decision reads the held-out split, "
            "so the adapters' held-out losses grade the choice on rows it never saw. Trials are skipped when not "
            "even two fit in `auto.cost` of the full training; then the probe decides.")
    return Section("Module selection (target_modules: auto)", text, blocks)


def _selection_plot(name: str, decision: dict) -> Plot:
    fig, ax = figure(6.5, 4)
    tried = [c for c in decision["candidates"] if c["trial"]]
    if tried:  # does the probe predict the trials?
        for c in tried:
            ax.scatter([c["probe_score"]], [trial_losses(c["trial"])[-1]], s=40)
            ax.annotate(ascii_label(f"{c['label']} ({c['trial']['steps']} steps)"),
                        (c["probe_score"], trial_losses(c["trial"])[-1]), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)
        ax.set(xlabel="probe score (expected gain of the first step)",
               ylabel="trial loss on the selection rows (last round)", title=f"{ascii_label(name)}: probe vs trials")
        ax.margins(x=0.25, y=0.15)
    else:
        labels = [c["label"] for c in decision["candidates"]][::-1]
        colors = ["tab:orange" if label == decision["winner"] else "tab:blue" for label in labels]
        ax.barh([ascii_label(label) for label in labels], [c["probe_score"] for c in decision["candidates"]][::-1],
                color=colors)
        ax.set(xlabel="probe score at the matched rank", title=f"{ascii_label(name)}: probe scores (no trials)")
    ax.grid(alpha=0.3)
    return Plot(f"selection_{name}", f"module selection for {name}", png(fig))


def one_model_section(data: RunData) -> Section | None:
    """Merged models of the run against their adapters: held-out loss, exact match, share of the gain kept, cost."""
    merged = [(r, _merge_report(Path(r["path"]))) for r in data.eval["rows"] if r["kind"] == "merged"]
    merged = [(row, report) for row, report in merged if report]
    if not merged:
        return None
    rows, bars = [], {}
    for row, report in merged:
        kept = report.get("heldout", {}).get("datasets", {})
        weights = ", ".join(f"{a['name']} {a['weight']:g}" for a in report["adapters"])
        search = report.get("weights_search")
        for name, entry in kept.items():
            cell = data.cell(row["name"], name)
            em = "-" if cell.get("exact_match") is None else f"{cell['exact_match']:.0%}"
            share = entry.get("kept")
            rows.append([row["name"], f"{report['method_requested']} ({weights})", name, num(cell.get("loss")), em,
                         "-" if share is None else f"{share:.0%}", f"{entry.get('rows', '-')}",
                         f"search {search['evaluations']} weightings" if search else "-"])
            if share is not None:
                bars.setdefault(row["name"], {})[name] = share
    routing = (data.eval.get("routing") or {}).get("datasets", {})
    for name, cell in routing.items():
        if cell.get("accuracy") is not None:
            rows.append(["model: auto (routing)", "each prompt to the adapter the router picks", name, "-", "-",
                         f"routed right {cell['accuracy']:.0%}", str(cell["prompts"]), "a router at serving time"])
    table = Table(["model", "method (weights)", "data", "held-out loss\n(rows listed)", "exact match", "gain kept",
                   "rows", "extra cost"], rows, "one-model",
                  caption="gain kept = (base loss − merged loss) / (base loss − adapter loss) on the rows listed: all "
                          "held-out rows, or for weights-search the half its search never saw")
    blocks: list[Table | Plot] = [table]
    if bars:
        blocks.append(_kept_plot(bars))
    text = ("One standalone model for several datasets: each merged model of the run (loraplex merge) on the data of "
            "the adapters it holds, and how much of each adapter's held-out loss improvement it keeps. "
            "benchmarks/merge_retention.py compares every method and the baselines (one adapter on the union of the "
            "data, routing) on the demo.")
    return Section("One model for all datasets", text, blocks)


def _merge_report(folder: Path) -> dict | None:
    path = folder / MERGE_REPORT
    try:
        return read_record(path, MergeRecord).as_dict() if path.is_file() else None
    except RecordError:
        return None


def _kept_plot(bars: dict[str, dict[str, float]]) -> Plot:
    fig, ax = figure(7, 4)
    datasets = sorted({d for values in bars.values() for d in values})
    width = 0.8 / len(bars)
    for i, (model, values) in enumerate(bars.items()):
        xs = [j + i * width for j, d in enumerate(datasets) if d in values]
        ax.bar(xs, [100 * values[d] for d in datasets if d in values], width, label=ascii_label(model))
    ax.axhline(90, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks([j + width * (len(bars) - 1) / 2 for j in range(len(datasets))], [ascii_label(d) for d in datasets])
    ax.set(ylabel="% of the adapter's held-out gain kept", title="One model for all datasets")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return Plot("one_model", "share of each adapter's gain kept by each merged model", png(fig))


