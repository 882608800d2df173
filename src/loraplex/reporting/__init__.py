"""`loraplex report`: a run's recipe, training curves, eval matrix, cost vs gain, module choices, module selection,
one model for all datasets and samples, written as report.md (plots beside it in report-assets/) and a
self-contained report.html (plots inlined as base64 PNG, no network).

`blocks`: tables, plots and their rendering; `sections`: training and evaluation; `choices`: what `target_modules:
auto` chose and what merged models keep.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir, atomic_write_text
from ..evaluation import GenerationSettings, evaluate_run, load_eval
from ..run import (REPORT_ASSETS, REPORT_HTML, REPORT_MD, adapter_dir, adapter_metadata, is_complete, read_recipe,
                   stale_outputs, weights_hash, writer_lock)
from .blocks import Plot, RunData, Section, Table, render_html, render_markdown
from .choices import one_model_section, selection_section
from .sections import (comparison_section, cost_section, curves_section, matrix_section, recipe_section,
                       samples_section)

__all__ = ["ReportFiles", "load_run", "write_report"]


@dataclass(frozen=True)
class ReportFiles:
    """What `loraplex.report` wrote into the run folder."""

    markdown: Path  # report.md (its plots in report-assets/ beside it)
    html: Path  # report.html, self-contained (plots inlined)
    stale: list[str]  # outputs made with adapters replaced since, as the report lists them


def write_report(run_dir: str | Path) -> ReportFiles:
    """Write report.md and report.html into the run folder (evaluating first when eval.json is missing or was made
    with adapters replaced since). Merged models made with replaced adapters are listed."""
    run_dir = Path(run_dir)
    with writer_lock(run_dir, ["report"], "loraplex report"):
        return _write(run_dir, load_run(run_dir))


def _write(run_dir: Path, data: RunData) -> ReportFiles:
    stale = stale_outputs(run_dir)
    sections = [Section("Stale outputs", "Made with adapters that have been replaced since; evaluate or merge again.",
                        [Table(["what", "made with"], [line.split(": made with ", 1) for line in stale])])
                if stale else None,
                recipe_section(data), curves_section(data), matrix_section(data), cost_section(data),
                comparison_section(data), selection_section(data), one_model_section(data), samples_section(data)]
    sections = [s for s in sections if s is not None]
    title = f"loraplex report: {data.eval['run']} ({data.eval['base_model']})"
    with atomic_dir(run_dir / REPORT_ASSETS) as tmp:
        for plot in (b for s in sections for b in s.blocks if isinstance(b, Plot)):
            (tmp / f"{plot.name}.png").write_bytes(plot.png)
    md_path, html_path = run_dir / REPORT_MD, run_dir / REPORT_HTML
    atomic_write_text(md_path, render_markdown(title, sections))
    atomic_write_text(html_path, render_html(title, sections))
    return ReportFiles(md_path, html_path, stale)


def load_run(run_dir: Path) -> RunData:
    recipe = read_recipe(run_dir)
    adapters = {d["name"]: adapter_metadata(adapter_dir(run_dir, d["name"])) for d in recipe["datasets"]
                if is_complete(adapter_dir(run_dir, d["name"]))}
    result = load_eval(run_dir)
    if result is None or _is_stale(run_dir, adapters, result):
        merged = [r["path"] for r in (result or {}).get("rows", [])
                  if r["kind"] == "merged" and Path(r["path"]).is_dir()]
        settings = GenerationSettings(**result["generation"]) if result else None  # as the user last chose
        result = evaluate_run(run_dir, merged=merged, generation=settings).as_dict()
    return RunData(run_dir, recipe, adapters, result)


def _is_stale(run_dir: Path, adapters: dict[str, dict], result: dict) -> bool:
    """eval.json misses an adapter, or evaluated one that has been replaced since (by its weights' hash)."""
    rows = {r["name"]: r for r in result["rows"] if r["kind"] == "adapter"}
    return set(rows) != set(adapters) or any(
        rows[name].get("adapter_weights", {}).get(name) != weights_hash(adapter_dir(run_dir, name))
        for name in adapters)


