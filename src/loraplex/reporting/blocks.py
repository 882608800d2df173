"""The report's building blocks: tables, plots, sections, the run's data, and their Markdown / HTML rendering.

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

from ..run import REPORT_ASSETS


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



def targets_text(value) -> str:
    return value if isinstance(value, str) else ",".join(value)


def num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)




def figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots()


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def nan_of(value: float | None) -> float:
    return math.nan if value is None else float(value)


def ascii_label(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")




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
             f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
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
