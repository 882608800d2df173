"""README.md's Python block, run as written against a tiny model: `recipe.yaml` in the working folder names the
tiny Llama and two small datasets (zh, en) trained for a few steps."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def test_the_readme_python_block_runs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    blocks = [b for b in python_blocks(README.read_text(encoding="utf-8")) if b.startswith("import loraplex\n")]
    assert len(blocks) == 1 and "loraplex.train(RECIPE)" in blocks[0]  # the library's section (not the server's)
    for name in ("prepare", "train", "select", "evaluate", "report", "merge", "inspect", "export", "load"):
        assert f"loraplex.{name}(" in blocks[0], name  # the section shows the whole public API but serve
    words = ["apple", "river", "stone", "cloud", "amber", "pilot"]
    write_jsonl(tmp_path / "en.jsonl", [{"instruction": f"Repeat {w}.", "output": f"{w} {w}"} for w in words * 4])
    write_jsonl(tmp_path / "zh.jsonl", [{"instruction": f"重复：{w}", "output": w * 2} for w in words * 4])
    recipe = {"model": {"path": str(tiny_model_dir), "dtype": "float32"}, "output_dir": "runs",
              "defaults": {"lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 2, "batch_size": 4, "save_steps": 50}},
              "datasets": [{"name": "zh", "path": "zh.jsonl", "target_modules": ["q_proj"]},
                           {"name": "en", "path": "en.jsonl", "target_modules": ["v_proj"]}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    assert [s.name for s in scope["stats"]] == ["zh", "en"] and all(s.answer_tokens > 0 for s in scope["stats"])
    assert set(scope["run"].adapters) == {"zh", "en"} and (tmp_path / "runs" / "recipe" / "merged" / "zh+en").is_dir()
    assert scope["report"].method == "sum" and [a.weight for a in scope["report"].adapters] == [1.0, 0.5]
    matrix = scope["matrix"]  # its diagonal is the held-out loss training recorded
    assert matrix.rows[-1]["name"] == "merged:zh+en"
    assert matrix.metrics["zh"]["zh"]["loss"] == pytest.approx(scope["run"].adapters["zh"]["heldout_loss"], abs=1e-5)
    assert scope["files"].html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    adapters = tmp_path.resolve() / "runs" / "recipe" / "adapters"
    assert scope["vllm"].adapters == {n: adapters / n for n in ("zh", "en")}
    assert list(scope["decisions"]) == ["zh"] and scope["decisions"]["zh"].winner
    assert float(capsys.readouterr().out.strip()) == 2.0  # alpha / r
    assert scope["zh_model"] is scope["base_model"]  # one model: the adapter switched off, not a copy
