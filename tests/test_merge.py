"""`loraplex merge` on a tiny random Llama, with adapters whose B is non-zero (a merge test with B = 0
proves nothing): W' = W + scaling·B@A checked against a direct computation from the safetensors, logits
against PEFT, disjoint and shared modules, DoRA, held-out loss kept, the CLI, refusals."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import write_jsonl
from loraplex.cli import app
from loraplex.errors import LoraplexError, ParameterError
from loraplex.merging import merge
from loraplex.merging.plan import MergeMethod, plan_merge
from loraplex.models import base_fingerprint, load_model, resolve_base
from loraplex.records import MergeRecord

runner = CliRunner()
Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def flat(text: str) -> str:
    return " ".join(text.split())


def make_adapter(run_dir: Path, name: str, base_dir: Path, target_modules: list[str], r: int = 4, alpha: float = 8,
                 rslora: bool = False, dora: bool = False, seed: int = 0, **meta) -> Path:
    """A PEFT adapter with random (non-zero) B, saved with a loraplex.json whose fingerprint matches the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = resolve_base(str(base_dir))
    model = load_model(base)
    fingerprint = base_fingerprint(model)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, use_rslora=rslora,
                        use_dora=dora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0, 0.05)
            if "lora_magnitude_vector" in pname:
                param.mul_(1 + 0.2 * torch.rand_like(param))
    adapter_dir = run_dir / "adapters" / name
    peft_model.save_pretrained(adapter_dir)
    info = {"name": name, "base_model": base.name, "base_model_location": base.location,
            "base_fingerprint": fingerprint, "dtype": "float32", "config": {"template": None}, **meta}
    (adapter_dir / "loraplex.json").write_text(json.dumps(info), encoding="utf-8")
    return adapter_dir


def direct_delta(adapter_dir: Path, module: str) -> torch.Tensor:
    """scaling·B@A straight from the adapter files, without loraplex."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    A, B = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
    scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    return scaling * (B.double() @ A.double())


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.name.encode() + (path.read_bytes() if path.is_file() else b"/"))
    return digest.hexdigest()



@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("merge") / "run"
    make_adapter(run_dir, "q", tiny_model_dir, ["q_proj"], r=4, alpha=8, seed=1)
    make_adapter(run_dir, "v", tiny_model_dir, ["v_proj"], r=4, alpha=8, rslora=True, seed=2)
    make_adapter(run_dir, "qv", tiny_model_dir, ["q_proj", "v_proj"], r=4, alpha=16, seed=3)
    make_adapter(run_dir, "dora", tiny_model_dir, ["o_proj"], r=4, alpha=8, dora=True, seed=4)
    make_adapter(run_dir, "dora_q", tiny_model_dir, ["q_proj"], r=4, alpha=8, dora=True, seed=5)
    make_adapter(run_dir, "alien", tiny_model_dir, ["q_proj"], seed=6, base_model="other-llama",
                 base_fingerprint="0123456789abcdef")
    return run_dir


@pytest.fixture(scope="module")
def merged_q(run, tiny_model_dir) -> tuple[Path, MergeRecord]:
    base_before = folder_digest(tiny_model_dir)
    out = run.parent / "merged-q"
    report = merge(run, ["q"], out_dir=out)
    assert folder_digest(tiny_model_dir) == base_before, "the base folder must never be modified"
    return out, report


@pytest.fixture(scope="module")
def merged_v(run) -> tuple[Path, MergeRecord]:
    out = run.parent / "merged-v"
    return out, merge(run, ["v"], out_dir=out)


@pytest.mark.parametrize("which", ["merged_q", "merged_v"])  # plain LoRA (alpha/r) and rsLoRA (alpha/sqrt(r))
def test_merged_weights_equal_w_plus_scaling_ba(which, request, run, tiny_model_dir):
    out, report = request.getfixturevalue(which)
    name, leaf = ("q", "q_proj") if which == "merged_q" else ("v", "v_proj")
    base, merged = weights_of(tiny_model_dir), weights_of(out)
    modules = [f"model.layers.{i}.self_attn.{leaf}" for i in range(2)]
    for module in modules:
        expected = base[f"{module}.weight"] + direct_delta(run / "adapters" / name, module)
        torch.testing.assert_close(merged[f"{module}.weight"], expected, rtol=0, atol=1e-6)
        assert (merged[f"{module}.weight"] - base[f"{module}.weight"]).abs().max() > 1e-3  # merged != base
    for key in base:  # every other weight is the base's, bit for bit
        if key.removesuffix(".weight") not in modules:
            assert torch.equal(merged[key], base[key]), key
    scaling = report.adapters[0].scaling
    assert scaling == (8 / 4 if name == "q" else 8 / math.sqrt(4))
    weights = report.verification["weights"]
    assert set(weights["modules"]) == set(modules) and weights["max_relative"] < 1e-6


def test_merged_logits_equal_base_plus_adapter(merged_q, run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, report = merged_q
    merged = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(load_model(resolve_base(str(tiny_model_dir))), run / "adapters" / "q")
    x = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        expected = reference(input_ids=x).logits
        with reference.disable_adapter():
            plain = reference(input_ids=x).logits
        got = merged(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3
    logits = report.verification["logits"]
    assert logits["prompts"] >= 3 and logits["max_abs_diff"] < logits["tolerance"]


def test_merged_folder_is_a_standalone_model(merged_q):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out, report = merged_q
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in n or "base_model.model" in n for n in model.state_dict())
    assert not any("base_model.model" in k or "lora_" in k for k in load_file(out / "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    GenerationConfig.from_pretrained(out)
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["verification"]["weights"]["max_relative"] == report.verification["weights"]["max_relative"]
    assert "one adapter: exact" in saved["method_note"]
    assert saved["heldout"]["skipped"]  # this synthetic run has no recipe: said, not failed


def test_disjoint_adapters_add_exactly(run, merged_q, merged_v):
    lines: list[str] = []
    out = run.parent / "merged-q-v"
    import loraplex.merging  # noqa: F401 - importing the module must not shadow the package function

    assert callable(loraplex.merge)
    report = loraplex.merge(run, ["q", "v"], out_dir=out, echo=lines.append)
    both, q_alone, v_alone = weights_of(out), weights_of(merged_q[0]), weights_of(merged_v[0])
    for key in both:
        source = q_alone if "q_proj" in key else v_alone
        torch.testing.assert_close(both[key], source[key], rtol=0, atol=1e-6)
    assert report.interference[0]["shared_modules"] == [] and report.exact
    assert any("q × v: no shared module" in line for line in lines)
    assert any("disjoint target modules: the 2 adapters add exactly" in line for line in lines)


def test_shared_module_gives_the_weighted_sum(run, tiny_model_dir):
    lines: list[str] = []
    out = run.parent / "merged-shared"
    report = merge(run, ["q", "qv"], weights=[0.7, -0.3], out_dir=out, echo=lines.append)
    base, merged = weights_of(tiny_model_dir), weights_of(out)
    q_dir, qv_dir = run / "adapters" / "q", run / "adapters" / "qv"
    expected = base[f"{Q0}.weight"] + 0.7 * direct_delta(q_dir, Q0) - 0.3 * direct_delta(qv_dir, Q0)
    torch.testing.assert_close(merged[f"{Q0}.weight"], expected, rtol=0, atol=1e-6)
    expected_v = base[f"{V1}.weight"] - 0.3 * direct_delta(qv_dir, V1)
    torch.testing.assert_close(merged[f"{V1}.weight"], expected_v, rtol=0, atol=1e-6)
    pair = report.interference[0]
    assert pair["shared_modules"] == [Q0, Q0.replace(".0.", ".1.")]
    d1, d2 = 0.7 * direct_delta(q_dir, Q0), -0.3 * direct_delta(qv_dir, Q0)
    assert pair["cosine"][Q0] == pytest.approx(float((d1 * d2).sum() / (d1.norm() * d2.norm())), abs=1e-5)
    assert any("q × qv: share 2 modules" in line and "q_proj ×2: cos mean" in line for line in lines)
    assert report.exact and "exact on shared modules too" in report.method_note
    assert report.verification["logits"]["max_abs_diff"] < report.verification["logits"]["tolerance"]


def test_peft_linear_is_checked_against_peft_and_reported_not_exact(run, tiny_model_dir):
    out = run.parent / "merged-linear"
    report = merge(run, ["q", "qv"], method="linear", out_dir=out)
    assert not report.exact and "NOT an exact sum" in report.method_note
    shared = report.verification["weights"]["modules"][Q0]
    assert shared["relative"] < 1e-4  # equals PEFT's combined adapter ...
    assert shared["exact_sum_relative_deviation"] > 1e-3  # ... which is not the exact sum
    assert "PEFT" in report.verification["logits"]["reference"]


def test_peft_ties_prunes_even_disjoint_modules(run):
    report = merge(run, ["q", "v"], method="ties", density=0.5, out_dir=run.parent / "merged-ties")
    assert not report.exact and "prunes values (density 0.5)" in report.method_note
    assert "cross terms" not in report.method_note  # nothing is shared
    assert report.verification["logits"]["max_abs_diff"] < report.verification["logits"]["tolerance"]
    with pytest.raises(LoraplexError, match="^density: 0 is not a share"):
        merge(run, ["q", "v"], method="ties", density=0, out_dir=run.parent / "never")


def test_peft_linear_with_rslora_first_is_exact_on_disjoint_modules(run, merged_q, merged_v):
    """PEFT's combined adapter inherits use_rslora from the first adapter; its scaling must still be 1."""
    out = run.parent / "merged-linear-disjoint"
    report = merge(run, ["v", "q"], method="linear", out_dir=out)
    both, q_alone, v_alone = weights_of(out), weights_of(merged_q[0]), weights_of(merged_v[0])
    for key in both:
        torch.testing.assert_close(both[key], (q_alone if "q_proj" in key else v_alone)[key], rtol=0, atol=1e-6)
    assert report.exact and "method linear (PEFT add_weighted_adapter) is exact here" in report.method_note


def test_dora_is_merged_by_its_own_formula(run, tiny_model_dir):
    out = run.parent / "merged-dora"
    report = merge(run, ["dora", "q"], out_dir=out)
    base, merged = weights_of(tiny_model_dir), weights_of(out)
    adapter_dir = run / "adapters" / "dora"
    module = "model.layers.1.self_attn.o_proj"
    magnitude = load_file(adapter_dir / "adapter_model.safetensors")[f"base_model.model.{module}.lora_magnitude_vector"]
    V = base[f"{module}.weight"] + direct_delta(adapter_dir, module)
    expected = (magnitude.double() / V.norm(dim=1))[:, None] * V  # m·(W + ΔW)/‖W + ΔW‖, row-wise
    torch.testing.assert_close(merged[f"{module}.weight"], expected, rtol=0, atol=1e-6)
    assert (merged[f"{module}.weight"] - V).abs().max() > 1e-3  # not the plain LoRA formula
    q_expected = base[f"{Q0}.weight"] + direct_delta(run / "adapters" / "q", Q0)
    torch.testing.assert_close(merged[f"{Q0}.weight"], q_expected, rtol=0, atol=1e-6)
    logits = report.verification["logits"]  # against PEFT's DoRA forward with both adapters active
    assert logits["max_abs_diff"] < logits["tolerance"]


def test_refusals(run, tiny_model_dir):
    base_name = resolve_base(str(tiny_model_dir)).name
    fingerprint = base_fingerprint(load_model(resolve_base(str(tiny_model_dir))))
    with pytest.raises(LoraplexError) as err:
        merge(run, ["alien"], out_dir=run.parent / "never")
    message = str(err.value)
    assert "other-llama" in message and "0123456789abcdef" in message
    assert base_name in message and fingerprint in message
    assert not (run.parent / "never").exists()
    with pytest.raises(LoraplexError, match="DoRA rescales each weight row"):
        merge(run, ["dora_q", "q"], out_dir=run.parent / "never")
    with pytest.raises(LoraplexError, match="DoRA adapter, which PEFT's ties cannot combine"):
        merge(run, ["dora"], method="ties", out_dir=run.parent / "never")
    with pytest.raises(LoraplexError, match="did you mean 'qv'"):
        merge(run, ["qvv"], out_dir=run.parent / "never")
    with pytest.raises(LoraplexError, match="^weights: 2 weights for 1 adapters"):
        merge(run, ["q"], weights=[1, 2], out_dir=run.parent / "never")
    # the library takes Python values and names its parameters (the CLI splits "q,v" and says --adapters)
    with pytest.raises(ParameterError, match=r"^adapters: 'q,v' is not a list of adapter names, e\.g\. adapters="):
        merge(run, "q,v", out_dir=run.parent / "never")
    with pytest.raises(ParameterError, match=r"^weights: '1,2' is not a list of numbers"):
        merge(run, ["q"], weights="1,2", out_dir=run.parent / "never")
    with pytest.raises(ParameterError, match="^method: unknown method 'summ'; did you mean 'sum'") as err:
        merge(run, ["q"], method="summ", out_dir=run.parent / "never")
    assert err.value.param == "method"
    assert plan_merge(run, ["q"], None, MergeMethod.CAT, "float32").requested == "cat"  # an enum member works too
    with pytest.raises(LoraplexError, match="would replace or write into the base model, or replace the run"):
        merge(run, ["q"], out_dir=run)
    (run.parent / "occupied").mkdir()
    (run.parent / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(LoraplexError, match="is not a merged model"):
        merge(run, ["q"], out_dir=run.parent / "occupied")


def test_no_nested_base_model_prefix_anywhere(run, tiny_model_dir):
    from loraplex.adapters import load

    adapter_set = load(str(tiny_model_dir), {"q": run / "adapters" / "q", "v": run / "adapters" / "v"})
    assert not any("base_model.model.base_model" in k for k in adapter_set.model.state_dict())
    for name in ("q", "v", "qv"):
        keys = load_file(run / "adapters" / name / "adapter_model.safetensors")
        assert not any("base_model.model.base_model" in k for k in keys)


# --------------------------------------------------------------------------- a trained run: held-out loss, CLI


ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "amber", "pilot"] * 4]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    import os

    from loraplex import train

    tmp = tmp_path_factory.mktemp("trained")
    os.environ["LORAPLEX_HOME"] = str(tmp / "home")
    write_jsonl(tmp / "b.jsonl", ROWS)
    recipe = {"model": {"path": str(tiny_model_dir), "dtype": "float32"}, "output_dir": str(tmp / "runs"),
              "run_name": "t", "defaults": {"val_size": 0.25, "lora": {"r": 4, "alpha": 8},
                                            "train": {"max_steps": 4, "lr": 5e-2, "batch_size": 8, "save_steps": 100}},
              "datasets": [{"name": "b", "path": str(tmp / "b.jsonl"), "target_modules": ["v_proj"]}]}
    run_dir = train(recipe, progress=False).run_dir
    make_adapter(run_dir, "q", tiny_model_dir, ["q_proj"], seed=1)  # not in the recipe: no held-out split
    return run_dir


def test_heldout_improvement_kept_is_measured_and_flagged(trained_run):
    full = merge(trained_run, ["b"], out_dir=trained_run.parent / "b-full").heldout["datasets"]["b"]
    assert full["adapter"] < full["base"] and full["merged"] == pytest.approx(full["adapter"], abs=1e-4)
    assert full["kept"] == pytest.approx(1.0, abs=1e-3) and not full["below_threshold"]
    scaled = merge(trained_run, ["b"], weights=[0.2], out_dir=trained_run.parent / "b-scaled").heldout
    assert scaled["datasets"]["b"]["kept"] < 0.9 and scaled["datasets"]["b"]["below_threshold"]


def test_cli_merge_prints_interference_checks_and_heldout(trained_run):
    out = trained_run.parent / "cli-merged"
    args = ["merge", str(trained_run), "--adapters", "b,q", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for expected in ("b × q: no shared module (b: v_proj; q: q_proj)", "disjoint target modules: the 2 adapters add "
                     "exactly", "weights: max |W' − (W + Σ wᵢ·scalingᵢ·Bᵢ@Aᵢ", "logits on 5 prompts",
                     "held-out loss", "not a dataset of the run's recipe", f"merged model: {out}"):
        assert expected in text, expected
    report = json.loads((out / "merge_report.json").read_text())
    assert report["heldout"]["datasets"]["b"]["kept"] is not None
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "pass --overwrite" in flat(again.output)
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0
    wrong = runner.invoke(app, ["merge", str(trained_run), "--adapters", "bb", "--out", str(out)])
    assert wrong.exit_code == 2 and "did you mean 'b'" in flat(wrong.output)
