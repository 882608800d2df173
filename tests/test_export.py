"""`loraplex export vllm`: the `vllm serve` command for a run of synthetic adapters on the tiny model, its flags
and absolute paths, the rank rounding, the refusals vLLM would make (DoRA, extra tensors, rank), the warning for
a restricting --lora-target-modules, and the CLI."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.errors import LoraplexError
from loraplex.vllm_export import MAX_LORA_RANKS, base_note, vllm_command
from loraplex.models import COMPLETE_MARKER, load_model, resolve_base

runner = CliRunner()


def make_adapter(run_dir: Path, name: str, base_dir: Path, target_modules: list[str], r: int = 4,
                 dora: bool = False) -> Path:
    """A PEFT adapter saved as loraplex saves one (PEFT files + loraplex.json naming its base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = resolve_base(str(base_dir))
    model = get_peft_model(load_model(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules,
                                                        lora_dropout=0.0, use_dora=dora))
    folder = run_dir / "adapters" / name
    model.save_pretrained(folder)
    info = {"name": name, "base_model": base.name, "base_model_location": base.location, "dtype": "float32"}
    (folder / "loraplex.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def make_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "recipe.resolved.yaml").write_text("model:\n  path: tiny\ndatasets: {}\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def good_run(tiny_model_dir, tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("export") / "run")
    make_adapter(run, "zh", tiny_model_dir, ["q_proj"], r=4)
    make_adapter(run, "en", tiny_model_dir, ["v_proj", "o_proj"], r=12)
    return run


def test_the_command_has_every_flag_and_absolute_path(good_run, tiny_model_dir):
    export = vllm_command(good_run)
    adapters = good_run.resolve() / "adapters"
    assert export.command == [
        "vllm", "serve", str(tiny_model_dir), "--enable-lora",
        "--lora-modules", f"en={adapters / 'en'}", f"zh={adapters / 'zh'}",
        "--max-lora-rank", "16",  # r=12 rounds up to the next value vLLM accepts
        "--max-loras", "2"]
    assert export.target_modules == ["o_proj", "q_proj", "v_proj"]
    assert export.warnings == []
    text = export.text()
    assert "# target modules of the adapters (union): o_proj, q_proj, v_proj" in text
    assert f"# base model: the local folder {tiny_model_dir}" in text
    # the text is one shell command (comments above it) that parses back to the same argv
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert shlex.split(body.replace("\\\n", " ")) == export.command


def test_max_lora_rank_is_the_smallest_allowed_value():
    assert MAX_LORA_RANKS == (8, 16, 32, 64, 128, 256, 320, 512)


def test_a_gguf_conversion_is_named(tmp_path):
    folder = tmp_path / "SmolLM2-abc"
    folder.mkdir()
    (folder / COMPLETE_MARKER).write_text(json.dumps({"source": "/pkgs/SmolLM2.Q4_1.gguf"}))
    note = base_note(str(folder))
    assert "converted from /pkgs/SmolLM2.Q4_1.gguf" in note and "vLLM loads this folder" in note
    assert "hub id" in base_note("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_every_vllm_refusal_is_one_line_all_at_once(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run")
    make_adapter(run, "ok", tiny_model_dir, ["q_proj"])
    make_adapter(run, "dora", tiny_model_dir, ["q_proj"], dora=True)
    extra = make_adapter(run, "extra", tiny_model_dir, ["q_proj"])
    tensors = load_file(extra / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, extra / "adapter_model.safetensors")
    make_adapter(run, "big", tiny_model_dir, ["v_proj"], r=520)
    with pytest.raises(LoraplexError) as caught:
        vllm_command(run)
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("big: rank 520 is above vLLM's largest --max-lora-rank (512)")
    assert "datasets.big.lora.r=512" in problems[0]
    assert problems[1].startswith("dora: trained with DoRA (use_dora), which vLLM does not support")
    assert problems[2].startswith("extra: holds tensors other than LoRA A/B (base_model.model.lm_head.weight)")
    assert not any(p.startswith("ok:") for p in problems)


def test_restricted_target_modules_warn(good_run):
    export = vllm_command(good_run, ["q_proj", "v_proj"])
    assert export.command[-3:] == ["--lora-target-modules", "q_proj", "v_proj"]
    assert len(export.warnings) == 1
    assert export.warnings[0].startswith("en: targets o_proj, which --lora-target-modules q_proj v_proj leaves out")


def test_cli_prints_writes_and_refuses(good_run, tmp_path):
    printed = runner.invoke(app, ["export", "vllm", str(good_run)])
    assert printed.exit_code == 0, printed.output
    assert "vllm serve" in printed.stdout and "--max-loras 2" in printed.stdout
    out = tmp_path / "serve_vllm.sh"
    written = runner.invoke(app, ["export", "vllm", str(good_run), "--out", str(out)])
    assert written.exit_code == 0, written.output
    assert out.read_text().startswith("#!/bin/sh\n#") and "--enable-lora" in out.read_text()
    warned = runner.invoke(app, ["export", "vllm", str(good_run), "--lora-target-modules", "q_proj"])
    assert warned.exit_code == 0 and "warning: en: targets o_proj, v_proj" in warned.output
    missing = runner.invoke(app, ["export", "vllm", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "is not a loraplex run" in missing.output


def test_loraplex_export_dispatches_and_names_its_parameters(good_run, tmp_path):
    import loraplex
    from loraplex.errors import ParameterError

    out = tmp_path / "serve.sh"
    export = loraplex.export(good_run, loraplex.ExportFormat.VLLM, out=out)
    assert export.command == vllm_command(good_run).command and out.read_text() == "#!/bin/sh\n" + export.text()
    with pytest.raises(ParameterError, match=r"^out: .* exists; choose another file, or pass force=True") as again:
        loraplex.export(good_run, "vllm", out=out)
    assert again.value.param == "out"
    assert loraplex.export(good_run, "vllm", out=out, force=True).max_lora_rank == 16
    with pytest.raises(ParameterError, match="^adapters: the vllm export does not read it") as foreign:
        loraplex.export(good_run, "vllm", adapters=["zh"])
    assert foreign.value.param == "adapters"
    with pytest.raises(ParameterError, match="^to: 'onnx' is not an export format; choose one of 'vllm', 'gguf'"):
        loraplex.export(good_run, "onnx")
    refused = runner.invoke(app, ["export", "vllm", str(good_run), "--out", str(out)])  # the CLI names its flags
    assert refused.exit_code == 2 and "error: --out: " in refused.output and "pass --force to" in refused.output
