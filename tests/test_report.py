"""report.md / report.html of a tiny run: sections, self-contained HTML, CJK text, and the HTML opened in a
real headless browser (Debian's chromium) for a screenshot and the rendered DOM."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loraplex.reporting import write_report
from test_evaluate import make_run_recipe

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    from loraplex import train

    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(tmp / "home"))
        run_dir = train(make_run_recipe(tmp, tiny_model_dir), progress=False).run_dir
        assert not (run_dir / "eval.json").exists()
        written = write_report(run_dir)  # evaluates first
        md_path, html_path = written.markdown, written.html
    return run_dir, md_path, html_path


def section(html_text: str, css_class: str) -> str:
    match = re.search(rf'<table class="{css_class}">.*?</table>', html_text, re.S)
    assert match, f"no table of class {css_class}"
    return match.group(0)


def test_report_files_and_sections(report):
    run_dir, md_path, html_path = report
    assert (run_dir / "eval.json").is_file()
    assert md_path == run_dir / "report.md" and html_path == run_dir / "report.html"
    md = md_path.read_text(encoding="utf-8")
    for title in ("Recipe", "Training loss", "Eval matrix", "Cost vs gain", "Module choices on one dataset",
                  "Sample generations"):
        assert f"## {title}" in md
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (run_dir / image).read_bytes().startswith(b"\x89PNG")
    assert "| en_all | " in md and "all-linear" in md


def test_html_is_self_contained_utf8_with_cjk(report):
    _, _, html_path = report
    text = html_path.read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in text
    assert not re.search(r'(src|href)="(https?:)?//', text) and "<link" not in text and "<script" not in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 3  # loss curves, heatmap, cost vs gain
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "重复：苹果" in text  # a CJK test prompt in the samples, as UTF-8 text


def test_recipe_matrix_and_comparison_tables(report):
    run_dir, _, html_path = report
    text = html_path.read_text(encoding="utf-8")
    recipe = section(text, "recipe")
    assert "q_proj" in recipe and "v_proj" in recipe and "all-linear" in recipe and "% of base" in recipe
    matrix = section(text, "matrix")
    for name in ("base", "en", "en_all", "zh"):
        assert f"<th>{name}</th>" in matrix
    assert matrix.count('class="own"') == 3  # the diagonal
    result = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    comparison = section(text, "comparison")
    first = re.search(r"<tbody>\s*<tr><th>([^<]+)</th>", comparison).group(1)
    best = min(("en", "en_all"), key=lambda n: result["metrics"][n][n]["loss"])
    assert first == best and "zh" not in re.findall(r"<th>([^<]+)</th>", comparison)


def test_report_reuses_eval_json_until_an_adapter_changes(report):
    run_dir, _, _ = report
    eval_json = run_dir / "eval.json"
    before = eval_json.stat().st_mtime_ns
    write_report(run_dir)
    assert eval_json.stat().st_mtime_ns == before
    meta = run_dir / "adapters" / "zh" / "loraplex.json"
    os.utime(meta, ns=(before + 10**9, before + 10**9))  # touched, not changed: eval.json still holds
    write_report(run_dir)
    assert eval_json.stat().st_mtime_ns == before
    weights = run_dir / "adapters" / "zh" / "adapter_model.safetensors"  # zh replaced: evaluated again
    tensors = load_file(weights)
    first = next(iter(tensors))
    save_file({**tensors, first: tensors[first] + 1e-3}, weights)
    write_report(run_dir)
    assert eval_json.stat().st_mtime_ns > before


def test_report_command(report):
    from loraplex.cli import app

    run_dir, _, _ = report
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "report.html" in " ".join(result.output.split())


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def run_browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_a_headless_browser(report, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no chromium found (apt-get install chromium); the report was not opened in a browser")
    _, _, html_path = report
    screenshot = tmp_path / "report.png"
    shot = run_browser(browser, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000",
                       html_path.as_uri())
    assert screenshot.is_file(), shot.stderr[-2000:]
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000)
        rgb = image.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20)
        assert len(colors) > 50, "the screenshot is (nearly) blank"
        assert max(count for count, _ in colors) < 0.97 * 1280 * 2000  # not one colour across the page

    dom = run_browser(browser, tmp_path / "profile", "--dump-dom", html_path.as_uri()).stdout
    matrix = section(dom, "matrix")
    for name in ("base", "en", "en_all", "zh"):
        assert f"<th>{name}</th>" in matrix
    assert "重复：苹果" in dom


def test_a_selection_recorded_before_the_selection_split_still_renders():
    """Trial records written before the trials scored on selection rows call their losses "heldout"."""
    from loraplex.display import select_table
    from loraplex.selection import trial_losses

    old = {"steps": 8, "heldout": [1.5, 1.25], "train_loss": [2.0]}
    assert trial_losses(old) == [1.5, 1.25] and trial_losses({**old, "selection_loss": [0.5]}) == [0.5]
    decision = {"winner": "v_proj", "r": 4, "alpha": 8.0, "budget": 100, "decided_by": "trials", "seconds": 1.0,
                "trials": {"rounds": [[8, 2]]}, "candidates": [{"label": "v_proj", "rank": 4, "params": 100,
                                                                 "probe_score": 1.0, "trial": old}]}
    from rich.console import Console
    console = Console(record=True, width=200)
    console.print(select_table("a", decision))
    assert "1.500 → 1.250" in console.export_text()
