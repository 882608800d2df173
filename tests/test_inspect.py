"""`loraplex inspect`: the numbers (scaling, shapes, norms, values) against a direct computation."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import loraplex
from loraplex.cli import app
from loraplex.errors import LoraplexError
from loraplex.inspect_adapter import inspect_adapter
from test_merge import direct_delta, flat, make_adapter

runner = CliRunner()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("inspect")
    return {"plain": make_adapter(run_dir, "plain", tiny_model_dir, ["q_proj", "v_proj"], r=4, alpha=8, seed=1),
            "rslora": make_adapter(run_dir, "rslora", tiny_model_dir, ["v_proj"], r=4, alpha=8, rslora=True, seed=2),
            "dora": make_adapter(run_dir, "dora", tiny_model_dir, ["o_proj"], r=2, alpha=4, dora=True, seed=3)}


@pytest.mark.parametrize("name, scaling, formula", [("plain", 2.0, "lora_alpha/r = 8/4 = 2"),
                                                    ("rslora", 4.0, "lora_alpha/√r = 8/√4 = 4")])
def test_numbers_match_a_direct_computation(adapters, tiny_model_dir, name, scaling, formula):
    adapter_dir = adapters[name]
    report = inspect_adapter(adapter_dir)
    assert report.scaling == scaling and report.scaling_formula == formula
    assert report.use_rslora == (name == "rslora") and not report.use_dora
    assert "not W + B@A" in report.merge_formula
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert report.trainable_params == sum(t.numel() for t in tensors.values())
    base = load_file(tiny_model_dir / "model.safetensors")
    assert len(report.modules) == len(tensors) // 2
    for row in report.modules:
        A, B = (tensors[f"base_model.model.{row['name']}.lora_{part}.weight"] for part in "AB")
        W, delta = base[f"{row['name']}.weight"].double(), direct_delta(adapter_dir, row["name"])
        assert row["A_shape"] == [4, 64] and row["B_shape"] == [W.shape[0], 4]
        assert row["scaling"] == scaling and row["layer"] in (0, 1) and row["module"] in ("q_proj", "v_proj")
        assert row["A_norm"] == pytest.approx(float(A.double().norm()), rel=1e-5)
        assert row["B_norm"] == pytest.approx(float(B.double().norm()), rel=1e-5)
        assert row["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
        assert row["W_norm"] == pytest.approx(float(W.norm()), rel=1e-5)
        assert row["relative_delta_norm"] == pytest.approx(float(delta.norm() / W.norm()), rel=1e-5)
        assert row["delta_norm"] > 0


def test_layer_and_module_show_the_values(adapters, tiny_model_dir):
    adapter_dir = adapters["plain"]
    report = inspect_adapter(adapter_dir, layer=1, module="q_proj")
    name = "model.layers.1.self_attn.q_proj"
    assert [row["name"] for row in report.modules] == [name]
    values = report.values
    W = load_file(tiny_model_dir / "model.safetensors")[f"{name}.weight"].double()
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    A, B = (tensors[f"base_model.model.{name}.lora_{p}.weight"].double() for p in "AB")
    delta = direct_delta(adapter_dir, name)
    for key, expected in (("W", W), ("A", A), ("B", B), ("BA", B @ A), ("delta", delta), ("merged", W + delta)):
        torch.testing.assert_close(torch.tensor(values[key], dtype=torch.float64), expected[:4, :4], rtol=0, atol=1e-6)
    assert values["scaling"] == 2.0 and not torch.allclose(torch.tensor(values["delta"]), torch.tensor(values["BA"]))
    assert loraplex.inspect(adapter_dir, module="q_proj").values is None  # two layers: no values
    assert "values" not in loraplex.inspect(adapter_dir, module="q_proj").to_dict()  # nor in --json


def test_dora_reports_its_effective_change(adapters, tiny_model_dir):
    report = inspect_adapter(adapters["dora"], layer=0, module="o_proj")
    assert report.use_dora and "DoRA" in report.merge_formula and report.scaling == 2.0
    name = "model.layers.0.self_attn.o_proj"
    W = load_file(tiny_model_dir / "model.safetensors")[f"{name}.weight"].double()
    m = load_file(adapters["dora"] / "adapter_model.safetensors")[f"base_model.model.{name}.lora_magnitude_vector"]
    V = W + direct_delta(adapters["dora"], name)
    merged = (m.double() / V.norm(dim=1))[:, None] * V
    assert report.modules[0]["delta_norm"] == pytest.approx(float((merged - W).norm()), rel=1e-5)
    assert report.trainable_params == 2 * (2 * 64 + 64 * 2 + 64)  # A, B and the magnitude vector


def test_bad_selections_say_what_exists(adapters):
    with pytest.raises(LoraplexError, match="did you mean 'q_proj'"):
        inspect_adapter(adapters["plain"], module="qproj")
    with pytest.raises(LoraplexError, match="no v_proj in layer 7; its layers: 0, 1"):
        inspect_adapter(adapters["rslora"], layer=7, module="v_proj")
    with pytest.raises(LoraplexError, match="is not an adapter folder"):
        inspect_adapter(adapters["plain"].parent)


def test_cli_inspect_table_values_and_json(adapters):
    result = runner.invoke(app, ["inspect", str(adapters["plain"])])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for expected in ("adapter plain", "target modules: q_proj, v_proj", "r=4 lora_alpha=8 rsLoRA=no DoRA=no",
                     "scaling = lora_alpha/r = 8/4 = 2", "W' = W + s·B@A", "(not W + B@A)",
                     "trainable parameters: 1,792", "ΔW = 2·B@A", "‖ΔW‖/‖W‖", "q_proj", "v_proj", "4×64"):
        assert expected in text, expected
    result = runner.invoke(app, ["inspect", str(adapters["plain"]), "--layer", "0", "--module", "v_proj"])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "ΔW = 2·B@A" in text and "W + ΔW = W + 2·B@A" in text and "B@A (unscaled)" in text
    result = runner.invoke(app, ["inspect", str(adapters["rslora"]), "--json"])
    report = json.loads(result.stdout)
    assert report["scaling"] == 8 / math.sqrt(4) and report["modules"][0]["A_shape"] == [4, 64]
    wrong = runner.invoke(app, ["inspect", str(adapters["plain"]), "--module", "qproj"])
    assert wrong.exit_code == 2 and "did you mean 'q_proj'" in flat(wrong.output)
