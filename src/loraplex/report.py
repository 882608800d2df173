"""`loraplex report`: a run's recipe, training curves, eval matrix, cost vs gain, module choices and samples,
written as report.md (plots beside it in report-assets/) and a self-contained report.html (plots inlined
as base64 PNG, no network).

Plots are drawn with matplotlib's Agg canvas (no pyplot, no global backend change); their labels are
ASCII so no font lacks a glyph. Text in the tables (CJK included) is UTF-8.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_dir, atomic_write_text
from .evaluate import GenerationSettings, evaluate_run, load_eval
from .run import (ADAPTER_META, EVAL_FILE, REPORT_ASSETS, REPORT_HTML, REPORT_MD, adapter_dir, adapter_metadata,
                  count_text, is_complete, percent_of_base, read_recipe)



@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]  # "\n" in a cell is a line break
    css_class: str = ""
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to emphasize
    caption: str = ""


@dataclass
class Plot:
    name: str  # file stem in report-assets/
    alt: str
    png: bytes


@dataclass
class Section:
    title: str
    text: str = ""
    blocks: list[Table | Plot] = field(default_factory=list)


@dataclass
class RunData:
    run_dir: Path
    recipe: dict  # recipe.resolved.yaml
    adapters: dict[str, dict]  # name -> loraplex.json (trained adapters only)
    eval: dict

    def base_loss(self, column: str) -> float | None:
        base = next(r["name"] for r in self.eval["rows"] if r["kind"] == "base")
        return self.eval["metrics"][base][column]["loss"]

    def cell(self, row: str, column: str) -> dict:
        return self.eval["metrics"].get(row, {}).get(column, {})


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into the run folder (evaluating first when eval.json is missing
    or older than an adapter); returns their paths."""
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    sections = [recipe_section(data), curves_section(data), matrix_section(data), cost_section(data),
                comparison_section(data), selection_section(data), samples_section(data)]
    sections = [s for s in sections if s is not None]
    title = f"loraplex report: {data.eval['run']} ({data.eval['base_model']})"
    with atomic_dir(run_dir / REPORT_ASSETS) as tmp:
        for plot in (b for s in sections for b in s.blocks if isinstance(b, Plot)):
            (tmp / f"{plot.name}.png").write_bytes(plot.png)
    md_path, html_path = run_dir / REPORT_MD, run_dir / REPORT_HTML
    atomic_write_text(md_path, render_markdown(title, sections))
    atomic_write_text(html_path, render_html(title, sections))
    return md_path, html_path


def load_run(run_dir: Path) -> RunData:
    recipe = read_recipe(run_dir)
    adapters = {d["name"]: adapter_metadata(adapter_dir(run_dir, d["name"])) for d in recipe["datasets"]
                if is_complete(adapter_dir(run_dir, d["name"]))}
    result = load_eval(run_dir)
    if result is None or _is_stale(run_dir, adapters, result):
        merged = [r["path"] for r in (result or {}).get("rows", []) if r["kind"] == "merged" and Path(r["path"]).is_dir()]
        settings = GenerationSettings(**result["generation"]) if result else None  # as the user last chose
        result = evaluate_run(run_dir, merged=merged, generation=settings)
    return RunData(run_dir, recipe, adapters, result)


def _is_stale(run_dir: Path, adapters: dict[str, dict], result: dict) -> bool:
    evaluated = {r["name"] for r in result["rows"] if r["kind"] == "adapter"}
    eval_time = (run_dir / EVAL_FILE).stat().st_mtime
    return evaluated != set(adapters) or any(
        (adapter_dir(run_dir, name) / ADAPTER_META).stat().st_mtime > eval_time for name in adapters)


# --------------------------------------------------------------------------- sections


def _targets(value) -> str:
    return value if isinstance(value, str) else ",".join(value)


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def recipe_section(data: RunData) -> Section:
    rows = []
    for spec in data.recipe["datasets"]:
        meta = data.adapters.get(spec["name"])
        files = spec["path"] if isinstance(spec["path"], str) else ", ".join(spec["path"])
        trainable = f"{count_text(meta['trainable_params'])} ({percent_of_base(meta):.3f}%)" if meta else "not trained"
        lora, targets = spec["lora"], _targets(spec["target_modules"])
        if meta and "selection" in meta:  # target_modules: auto -> what it chose, at the rank matching its budget
            lora, targets = meta["config"]["lora"], f"auto → {_targets(meta['config']['target_modules'])}"
        rows.append([spec["name"], files, targets, str(lora["r"]), f"{lora['alpha']:g}", f"{spec['train']['lr']:g}",
                     _length(spec["train"]), trainable])
    table = Table(["dataset", "data", "target modules", "r", "alpha", "lr", "length", "trainable params (% of base)"],
                  rows, "recipe")
    return Section("Recipe", "One adapter per dataset entry, each trained against the untouched base.", [table])


def _length(train: dict) -> str:
    return f"{train['max_steps']} steps" if train.get("max_steps") else f"{train['epochs']:g} epochs"


def curves_section(data: RunData) -> Section | None:
    curves = {name: meta["train_loss_curve"] for name, meta in data.adapters.items() if meta.get("train_loss_curve")}
    if not curves:
        return None
    fig, ax = _figure(7, 4)
    for name, curve in curves.items():
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker=".", label=_ascii(name))
    ax.set(xlabel="step", ylabel="training loss (answer tokens)", title="Training loss per adapter")
    ax.grid(alpha=0.3)
    ax.legend()
    return Section("Training loss", "", [Plot("train_loss", "training loss curves", _png(fig))])


def matrix_section(data: RunData) -> Section:
    ev = data.eval
    columns = [c["name"] for c in ev["columns"]]
    header = ["model \\ data"] + columns
    rows, bold = [], set()
    for i, row in enumerate(ev["rows"]):
        cells = [row["name"]]
        for j, col in enumerate(columns):
            m = data.cell(row["name"], col)
            text = f"loss {_num(m.get('loss'))}\nppl {_num(m.get('perplexity'), '.2f')}\nacc {_num(m.get('token_accuracy'), '.1%')}"
            if m.get("exact_match") is not None:
                text += f"\nEM {m['exact_match']:.0%}\nchrF {_num(m.get('chrf'), '.1f')}"
            cells.append(text)
            if row.get("dataset") == col:
                bold.add((i, j + 1))
        rows.append(cells)
    routing = (ev.get("routing") or {}).get("datasets", {})
    if routing:
        rows.append(["auto (router)"] + [f"routed to its adapter: {routing[c]['accuracy']:.0%} of {routing[c]['prompts']}"
                                         if c in routing and routing[c]["accuracy"] is not None else "-"
                                         for c in columns])
    text = ("Rows: the base, each adapter, merged models; columns: each dataset's held-out split (loss, perplexity "
            "and token accuracy on answer tokens) and, where the dataset has a test split, exact match and chrF "
            "of greedy answers. Bold: an adapter on its own data."
            + (" Last row: how often `model: auto` (`loraplex serve`) sends the dataset's held-out prompts to an "
               "adapter trained on that dataset." if routing else ""))
    return Section("Eval matrix", text, [Plot("eval_matrix", "held-out loss heatmap", _heatmap(data, columns)),
                                         Table(header, rows, "matrix", bold)])


def _heatmap(data: RunData, columns: list[str]) -> bytes:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    names = [r["name"] for r in data.eval["rows"]]
    loss = np.array([[_nan(data.cell(n, c).get("loss")) for c in columns] for n in names])
    base = np.array([_nan(data.base_loss(c)) for c in columns])
    change = loss / base - 1  # relative to the base on the same data: -0.8 is 80% lower
    spread = max(float(np.nanmax(np.abs(change))) if np.isfinite(change).any() else 0.0, 1e-3)
    fig, ax = _figure(1.6 + 1.3 * len(columns), 1.2 + 0.6 * len(names))
    image = ax.imshow(change, cmap="RdYlGn_r", norm=TwoSlopeNorm(0, -spread, spread), aspect="auto")
    for i, name in enumerate(names):
        for j, _ in enumerate(columns):
            ax.text(j, i, _num(loss[i, j]), ha="center", va="center", fontsize=9)
        row = data.eval["rows"][i]
        if row.get("dataset") in columns:
            j = columns.index(row["dataset"])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, linewidth=2.5, edgecolor="black"))
    ax.set_xticks(range(len(columns)), [_ascii(c) for c in columns])
    ax.set_yticks(range(len(names)), [_ascii(n) for n in names])
    ax.set(xlabel="held-out data", ylabel="model", title="Held-out loss (colour: change vs base)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="loss / base loss - 1")
    return _png(fig)


def cost_section(data: RunData) -> Section | None:
    points = []
    for name, meta in data.adapters.items():
        base, own = data.base_loss(name), data.cell(name, name).get("loss")
        if base is not None and own is not None:
            label = f"{name}: {_targets(meta['config']['target_modules'])} r={meta['config']['lora']['r']}"
            points.append((meta["trainable_params"], base - own, label))
    if not points:
        return None
    fig, ax = _figure(7, 4.5)
    for x, y, label in points:
        ax.scatter([x], [y], s=40)
        ax.annotate(_ascii(label), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    xs = [x for x, _, _ in points]
    ax.set_xlim(min(xs) / 2, max(xs) * 6)  # room for the labels right of the points
    ax.margins(y=0.15)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="trainable parameters (log scale)", ylabel="held-out loss improvement over base",
           title="Cost vs gain per adapter")
    ax.grid(alpha=0.3, which="both")
    text = "Each adapter on its own held-out data: loss of the base minus loss of the adapter (higher is better)."
    return Section("Cost vs gain", text, [Plot("cost_vs_gain", "trainable parameters vs loss improvement", _png(fig))])


def comparison_section(data: RunData) -> Section | None:
    groups: dict[str, list[dict]] = {}
    for spec in data.recipe["datasets"]:
        files = spec["path"] if isinstance(spec["path"], str) else ", ".join(spec["path"])
        if spec["name"] in data.adapters:
            groups.setdefault(files, []).append(spec)
    tables = [_comparison_table(data, files, specs) for files, specs in groups.items() if len(specs) > 1]
    if not tables:
        return None
    text = ("Dataset entries over the same data file with different target modules or settings, best held-out "
            "loss first.")
    return Section("Module choices on one dataset", text, tables)


def _comparison_table(data: RunData, files: str, specs: list[dict]) -> Table:
    def loss(spec: dict) -> float:
        value = data.cell(spec["name"], spec["name"]).get("loss")
        return math.inf if value is None else value

    rows = []
    for spec in sorted(specs, key=loss):
        meta, cell = data.adapters[spec["name"]], data.cell(spec["name"], spec["name"])
        base = data.base_loss(spec["name"])
        gain = None if base is None or cell.get("loss") is None else base - cell["loss"]
        em = "-" if cell.get("exact_match") is None else f"{cell['exact_match']:.0%}"
        config = meta["config"]  # as trained (target_modules: auto resolved)
        rows.append([spec["name"], _targets(config["target_modules"]), f"{config['lora']['r']}/{config['lora']['alpha']:g}",
                     f"{count_text(meta['trainable_params'])} ({percent_of_base(meta):.3f}%)", _num(cell.get("loss")),
                     _num(gain), em, f"{meta['wall_time_s']:.0f}s"])
    return Table(["entry", "target modules", "r/alpha", "trainable params (% of base)", "held-out loss",
                  "gain over base", "exact match", "wall time"], rows, "comparison", caption=f"data: {files}")


def selection_section(data: RunData) -> Section | None:
    """`target_modules: auto`: per adapter, every candidate's probe score and trial losses, and a plot."""
    blocks: list[Table | Plot] = []
    for name, meta in data.adapters.items():
        decision = meta.get("selection")
        if not decision:
            continue
        rows = [[c["label"] + (" (chosen)" if c["label"] == decision["winner"] else ""), str(c["rank"]),
                 count_text(c["params"]), f"{c['probe_score']:.4g}",
                 " → ".join(f"{x:.3f}" for x in c["trial"]["heldout"]) if c["trial"] else "-"]
                for c in decision["candidates"]]
        full = decision.get("full_training_s")
        cost = f"; selection {decision['seconds']:.0f}s" + (f" = {decision['seconds'] / full:.0%} of the full "
                                                              f"training ({full:.0f}s)" if full else "")
        blocks.append(Table(["modules", "r", "params", "probe score", "trial held-out loss per round"], rows,
                            "selection", {(i, 0) for i, c in enumerate(decision["candidates"])
                                          if c["label"] == decision["winner"]},
                            caption=f"{name}: budget {count_text(decision['budget'])} parameters; decided by "
                                    f"{decision['decided_by']}{cost}{' (cached decision)' if decision.get('cached') else ''}"))
        blocks.append(_selection_plot(name, decision))
    if not blocks:
        return None
    text = ("`target_modules: auto` gives every candidate module set the same number of trainable parameters "
            "(its rank is set to match), scores each with a gradient probe on a few training batches (the norm of "
            "the loss gradient's best approximation of the candidate's rank, over its modules), and trains the "
            "probe's best sets and the references q_proj+v_proj and all-linear in short trials, keeping the better "
            "half by held-out loss after each round. Trials are skipped when they do not fit in `auto.cost` of the "
            "full training; then the probe decides.")
    return Section("Module selection (target_modules: auto)", text, blocks)


def _selection_plot(name: str, decision: dict) -> Plot:
    fig, ax = _figure(6.5, 4)
    tried = [c for c in decision["candidates"] if c["trial"]]
    if tried:  # does the probe predict the trials?
        for c in tried:
            ax.scatter([c["probe_score"]], [c["trial"]["heldout"][-1]], s=40)
            ax.annotate(_ascii(f"{c['label']} ({c['trial']['steps']} steps)"), (c["probe_score"], c["trial"]["heldout"][-1]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set(xlabel="probe score (higher: more of the gradient within reach)",
               ylabel="trial held-out loss (last round)", title=f"{_ascii(name)}: probe vs trials")
        ax.margins(x=0.25, y=0.15)
    else:
        labels = [c["label"] for c in decision["candidates"]][::-1]
        colors = ["tab:orange" if label == decision["winner"] else "tab:blue" for label in labels]
        ax.barh([_ascii(label) for label in labels], [c["probe_score"] for c in decision["candidates"]][::-1],
                color=colors)
        ax.set(xlabel="probe score at the matched rank", title=f"{_ascii(name)}: probe scores (no trials)")
    ax.grid(alpha=0.3)
    return Plot(f"selection_{name}", f"module selection for {name}", _png(fig))


def samples_section(data: RunData) -> Section | None:
    samples = data.eval.get("samples") or {}
    if not samples:
        return None
    tables = []
    for column, items in samples.items():
        shown = [r["name"] for r in data.eval["rows"] if r["kind"] == "base" or r.get("dataset") == column
                 or r["kind"] == "merged"]
        rows = [[item["question"], item["reference"]] + [item["outputs"].get(name, "-") or "(empty)" for name in shown]
                for item in items]
        tables.append(Table(["prompt", "reference"] + shown, rows, "samples", caption=f"test prompts of {column}"))
    return Section("Sample generations", "Greedy answers to the first test prompts of each dataset: base vs adapter.",
                   tables)


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots()


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


# --------------------------------------------------------------------------- rendering


def render_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""] + ([section.text, ""] if section.text else [])
        for block in section.blocks:
            if isinstance(block, Plot):
                lines += [f"![{block.alt}]({REPORT_ASSETS}/{block.name}.png)", ""]
                continue
            cell = lambda t: t.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
            lines += [f"*{block.caption}*", ""] if block.caption else []
            lines += ["| " + " | ".join(cell(h) for h in block.headers) + " |",
                      "|" + " --- |" * len(block.headers)]
            for i, row in enumerate(block.rows):
                lines.append("| " + " | ".join(f"**{cell(t)}**" if (i, j) in block.bold and t else cell(t)
                                               for j, t in enumerate(row)) + " |")
            lines.append("")
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", sans-serif;
       margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
caption { text-align: left; font-style: italic; padding: 2px 0; }
table.matrix td, table.comparison td { text-align: right; white-space: nowrap; }
table.matrix td.own { background: #e8f4e8; font-weight: bold; }
table.samples td { max-width: 320px; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def render_html(title: str, sections: list[Section]) -> str:
    esc = lambda t: html.escape(t).replace("\n", "<br>")  # noqa: E731
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        for block in section.blocks:
            if isinstance(block, Plot):
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">')
                continue
            caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
            parts.append(f'<table class="{block.css_class}">{caption}<thead><tr>'
                         + "".join(f"<th>{esc(h)}</th>" for h in block.headers) + "</tr></thead><tbody>")
            for i, row in enumerate(block.rows):
                cells = [f'<td class="own">{esc(t)}</td>' if (i, j) in block.bold else
                         (f"<th>{esc(t)}</th>" if j == 0 else f"<td>{esc(t)}</td>") for j, t in enumerate(row)]
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</tbody></table>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
