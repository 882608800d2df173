"""The report's sections on training and evaluation: recipe, loss curves, eval matrix, cost vs gain, module choices
compared on one data file, sample generations."""
from __future__ import annotations

import math

from ..lora_settings import variant_name
from ..run import count_text, percent_of_base
from .blocks import Plot, RunData, Section, Table, ascii_label, figure, nan_of, num, png, targets_text


def recipe_section(data: RunData) -> Section:
    rows = []
    for spec in data.recipe["datasets"]:
        meta = data.adapters.get(spec["name"])
        files = spec["path"] if isinstance(spec["path"], str) else ", ".join(spec["path"])
        trainable = f"{count_text(meta['trainable_params'])} ({percent_of_base(meta):.3f}%)" if meta else "not trained"
        lora, targets = spec["lora"], targets_text(spec["target_modules"])
        if meta and "selection" in meta:  # target_modules: auto -> what it chose, at the rank matching its budget
            lora, targets = meta["config"]["lora"], f"auto → {targets_text(meta['config']['target_modules'])}"
        rows.append([spec["name"], files, targets, str(lora["r"]), f"{lora['alpha']:g}", variant_name(lora),
                     f"{spec['train']['lr']:g}", _length(spec["train"]), trainable])
    table = Table(["dataset", "data", "target modules", "r", "alpha", "variant", "lr", "length",
                   "trainable params (% of base)"], rows, "recipe")
    return Section("Recipe", "One adapter per dataset entry, each trained against the untouched base.", [table])


def _length(train: dict) -> str:
    return f"{train['max_steps']} steps" if train.get("max_steps") else f"{train['epochs']:g} epochs"


def curves_section(data: RunData) -> Section | None:
    curves = {name: meta["train_loss_curve"] for name, meta in data.adapters.items() if meta.get("train_loss_curve")}
    if not curves:
        return None
    fig, ax = figure(7, 4)
    for name, curve in curves.items():
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker=".", label=ascii_label(name))
    ax.set(xlabel="step", ylabel="training loss (answer tokens)", title="Training loss per adapter")
    ax.grid(alpha=0.3)
    ax.legend()
    return Section("Training loss", "", [Plot("train_loss", "training loss curves", png(fig))])


def matrix_section(data: RunData) -> Section:
    ev = data.eval
    columns = [c["name"] for c in ev["columns"]]
    header = ["model \\ data"] + columns
    rows, bold = [], set()
    for i, row in enumerate(ev["rows"]):
        cells = [row["name"]]
        for j, col in enumerate(columns):
            m = data.cell(row["name"], col)
            text = (f"loss {num(m.get('loss'))}\nppl {num(m.get('perplexity'), '.2f')}\n"
                    f"acc {num(m.get('token_accuracy'), '.1%')}")
            if m.get("exact_match") is not None:
                text += f"\nEM {m['exact_match']:.0%}\nchrF {num(m.get('chrf'), '.1f')}"
            cells.append(text)
            if row.get("dataset") == col:
                bold.add((i, j + 1))
        rows.append(cells)
    routing = (ev.get("routing") or {}).get("datasets", {})
    if routing:
        rows.append(["auto (router)"] + [f"routed to its adapter: {routing[c]['accuracy']:.0%} of "
                                         f"{routing[c]['prompts']}"
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
    loss = np.array([[nan_of(data.cell(n, c).get("loss")) for c in columns] for n in names])
    base = np.array([nan_of(data.base_loss(c)) for c in columns])
    change = loss / base - 1  # relative to the base on the same data: -0.8 is 80% lower
    spread = max(float(np.nanmax(np.abs(change))) if np.isfinite(change).any() else 0.0, 1e-3)
    fig, ax = figure(1.6 + 1.3 * len(columns), 1.2 + 0.6 * len(names))
    image = ax.imshow(change, cmap="RdYlGn_r", norm=TwoSlopeNorm(0, -spread, spread), aspect="auto")
    for i, name in enumerate(names):
        for j, _ in enumerate(columns):
            ax.text(j, i, num(loss[i, j]), ha="center", va="center", fontsize=9)
        row = data.eval["rows"][i]
        if row.get("dataset") in columns:
            j = columns.index(row["dataset"])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, linewidth=2.5, edgecolor="black"))
    ax.set_xticks(range(len(columns)), [ascii_label(c) for c in columns])
    ax.set_yticks(range(len(names)), [ascii_label(n) for n in names])
    ax.set(xlabel="held-out data", ylabel="model", title="Held-out loss (colour: change vs base)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="loss / base loss - 1")
    return png(fig)


def cost_section(data: RunData) -> Section | None:
    points = []
    for name, meta in data.adapters.items():
        base, own = data.base_loss(name), data.cell(name, name).get("loss")
        if base is not None and own is not None:
            label = f"{name}: {targets_text(meta['config']['target_modules'])} r={meta['config']['lora']['r']}"
            points.append((meta["trainable_params"], base - own, label))
    if not points:
        return None
    fig, ax = figure(7, 4.5)
    for x, y, label in points:
        ax.scatter([x], [y], s=40)
        ax.annotate(ascii_label(label), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    xs = [x for x, _, _ in points]
    ax.set_xlim(min(xs) / 2, max(xs) * 6)  # room for the labels right of the points
    ax.margins(y=0.15)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="trainable parameters (log scale)", ylabel="held-out loss improvement over base",
           title="Cost vs gain per adapter")
    ax.grid(alpha=0.3, which="both")
    text = "Each adapter on its own held-out data: loss of the base minus loss of the adapter (higher is better)."
    return Section("Cost vs gain", text, [Plot("cost_vs_gain", "trainable parameters vs loss improvement", png(fig))])


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
        rows.append([spec["name"], targets_text(config["target_modules"]),
                     f"{config['lora']['r']}/{config['lora']['alpha']:g}",
                     f"{count_text(meta['trainable_params'])} ({percent_of_base(meta):.3f}%)", num(cell.get("loss")),
                     num(gain), em, f"{meta['wall_time_s']:.0f}s"])
    return Table(["entry", "target modules", "r/alpha", "trainable params (% of base)", "held-out loss",
                  "gain over base", "exact match", "wall time"], rows, "comparison", caption=f"data: {files}")




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


