"""The benchmarks stay runnable: every loraplex name they import exists, and the speed ceiling's shape
bookkeeping reads a PEFT model correctly (the benchmarks themselves are too slow for the test suite)."""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def loraplex_imports():
    for path in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loraplex"):
                for alias in node.names:
                    yield path.name, node.module, alias.name


@pytest.mark.parametrize("where,module,name", list(loraplex_imports()))
def test_benchmark_imports_exist(where, module, name):
    mod = importlib.import_module(module)
    if not hasattr(mod, name):
        importlib.import_module(f"{module}.{name}")  # a submodule


def test_ceiling_reads_the_model_shapes(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from loraplex.models import load_model, resolve_base

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from speed_ceiling import Ceiling, model_shapes
    finally:
        sys.path.remove(str(BENCHMARKS))
    model = get_peft_model(load_model(resolve_base(str(tiny_model_dir))),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    shapes = model_shapes(model)
    assert shapes["layers"] == 2 and shapes["lora"] == {"q_proj": [64, 64, 4], "v_proj": [64, 32, 4]}
    assert shapes["linear"] == {"q_proj": [64, 64], "k_proj": [64, 32], "v_proj": [64, 32], "o_proj": [64, 64],
                                "gate_proj": [64, 128], "up_proj": [64, 128], "down_proj": [128, 64]}
    assert (shapes["heads"], shapes["kv_heads"], shapes["head_dim"], shapes["hidden"]) == (4, 2, 16, 64)
    ceiling = Ceiling(shapes, "float32")
    one = ceiling.pass_seconds([12, 20], 10)
    assert set(one) == {"linear", "lora", "attention", "lm_head"} and all(v > 0 for v in one.values())
    assert ceiling.pass_seconds([12, 20], 0).get("lm_head", 0.0) == 0.0
    at16, at32 = ceiling._attn_time(16), ceiling._attn_time(32)
    assert ceiling.attention(20) == pytest.approx(at16 + (at32 - at16) / 4)  # linear between grid points


def test_the_shared_benchmark_helpers(tmp_path, monkeypatch, capsys):
    import argparse

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common

    for script in ("variants", "merge_retention", "select_quality", "qlora_memory"):
        importlib.import_module(script)  # each finds what it takes from common
    line = common.cpu_line()
    assert f"{__import__('os').cpu_count()} cores" in line and "native bf16" in line and "load" in line
    assert set(common.cpu_features()) <= set(common.CPU_FEATURES)
    parser = argparse.ArgumentParser()
    common.add_seed_options(parser)
    common.add_output_options(parser, str(tmp_path / "work"))
    args = parser.parse_args(["--seeds", "2", "--first-seed", "5"])
    assert list(common.seeds(args)) == [5, 6] and args.out is None
    assert common.work_folder(args).is_dir() and capsys.readouterr().out.startswith("CPU ")
    calls = []
    assert common.median_seconds(lambda: calls.append(1), repeats=3) >= 0 and len(calls) == 3
    value, seconds = common.timed(lambda: 42)
    assert value == 42 and seconds >= 0
