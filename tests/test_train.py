"""Per-dataset training on a tiny random Llama: isolation, outputs, reload, --only, --resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from loraplex.models import base_fingerprint, load_model, resolve_base
from loraplex import train
from loraplex.lm.packed import PackedCollator, PaddedCollator, answer_loss_sum

ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "amber", "pilot"] * 8]


def make_recipe(tmp_path: Path, model_dir: Path, dtype: str = "float32", **train_overrides) -> dict:
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    write_jsonl(tmp_path / "b.jsonl", list(reversed(ROWS)))
    train_cfg = {"epochs": 4, "lr": 3e-2, "batch_size": 8, "save_steps": 4, "logging_steps": 1, **train_overrides}
    return {
        "model": {"path": str(model_dir), "dtype": dtype}, "output_dir": str(tmp_path / "runs"), "run_name": "t",
        "defaults": {"train": train_cfg, "lora": {"r": 4, "alpha": 8}},
        "datasets": [{"name": "a", "path": str(tmp_path / "a.jsonl"), "target_modules": ["q_proj"]},
                     {"name": "b", "path": str(tmp_path / "b.jsonl"), "target_modules": ["v_proj"]}],
    }


@pytest.fixture(scope="module", params=["float32", "bfloat16"])  # forced: the same on every CPU
def trained(request, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    os.environ["LORAPLEX_HOME"] = str(tmp / "home")
    recipe = make_recipe(tmp, tiny_model_dir, request.param)
    return recipe, train(recipe, progress=False)


def test_each_adapter_holds_only_its_own_modules(trained):
    _, result = trained
    for name, module in (("a", "q_proj"), ("b", "v_proj")):
        keys = load_file(result.run_dir / "adapters" / name / "adapter_model.safetensors").keys()
        assert keys and all("lora_" in k for k in keys)
        assert {k.split(".")[-3] for k in keys} == {module}, keys
        assert all("base_model.model.base_model" not in k for k in keys)


def test_base_fingerprint_is_that_of_the_base_in_the_training_dtype(trained, tiny_model_dir):
    recipe, result = trained
    dtype = getattr(torch, recipe["model"]["dtype"])
    fresh = base_fingerprint(load_model(resolve_base(str(tiny_model_dir)), dtype), dtype)
    for meta in result.adapters.values():
        assert meta["base_fingerprint"] == fresh and meta["dtype"] == recipe["model"]["dtype"]


def test_loss_decreases_and_metadata_is_complete(trained, tiny_model_dir):
    _, result = trained
    for name, meta in result.adapters.items():
        curve = [p["loss"] for p in meta["train_loss_curve"]]
        assert curve[-1] < curve[0]
        assert meta["heldout_loss"] < meta["heldout_loss_base"]
    # v_proj moves the residual stream directly: a clear drop even on a random 2-layer model
    b = result.adapters["b"]
    assert b["heldout_loss"] < b["heldout_loss_base"] - 0.1
    for meta in result.adapters.values():
        assert 0 < meta["trainable_params"] < meta["total_params"]
        assert meta["tokens_trained"] > 0 and meta["tokens_per_s"] > 0
    # q_proj (64 -> 64) and v_proj (64 -> 32 with 2 KV heads) give different counts: 2 layers x r x (in + out)
    assert result.adapters["a"]["trainable_params"] == 2 * 4 * (64 + 64)
    assert result.adapters["b"]["trainable_params"] == 2 * 4 * (64 + 32)
    # "% of base": against the base's own parameters, counted on a fresh copy of it
    base_params = sum(p.numel() for p in load_model(resolve_base(str(tiny_model_dir))).parameters())
    for meta in result.adapters.values():
        assert meta["total_params"] - meta["trainable_params"] == base_params
        assert meta["trainable_percent_of_base"] == pytest.approx(100 * meta["trainable_params"] / base_params)


def test_reload_gives_identical_logits(trained, tiny_model_dir):
    from peft import PeftModel

    _, result = trained
    assert all(meta["reload_max_abs_diff"] == 0.0 for meta in result.adapters.values())
    base = load_model(resolve_base(str(tiny_model_dir)))
    peft_model = PeftModel.from_pretrained(base, result.run_dir / "adapters" / "a")
    assert not any("base_model.model.base_model" in k for k in peft_model.state_dict())
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=x).logits
        adapted = peft_model(input_ids=x).logits
    assert (plain - adapted).abs().max() > 1e-4  # the adapter does something


def test_only_trains_the_named_dataset(tiny_model_dir, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model_dir, max_steps=2)
    result = train(recipe, only=["b"], progress=False)
    assert list(result.adapters) == ["b"]
    assert not (result.run_dir / "adapters" / "a").exists()


def test_the_base_held_out_loss_is_shared_only_by_adapters_on_the_same_rows(tiny_model_dir, tmp_path, monkeypatch):
    """Adapters on the same tokenized rows share one base pass; the same file with another system prompt is other
    rows and gets its own (a cache keyed on the data file alone would hand it a's figure)."""
    from loraplex.training import runner

    recipe = make_recipe(tmp_path, tiny_model_dir, max_steps=1)
    a = recipe["datasets"][0]
    recipe["datasets"] = [a, {**a, "name": "a_v", "target_modules": ["v_proj"]},
                          {**a, "name": "a_sys", "system": "Answer in capitals, always, whatever the question."}]
    passes = []
    real = runner.heldout_metrics
    monkeypatch.setattr(runner, "heldout_metrics", lambda model, rows: passes.append(rows) or real(model, rows))
    metas = train(recipe, progress=False).adapters
    assert metas["a"]["heldout_loss_base"] == metas["a_v"]["heldout_loss_base"]
    assert metas["a_sys"]["heldout_loss_base"] != metas["a"]["heldout_loss_base"]
    assert len(passes) == 2 + 3  # the base on a's rows and on a_sys's rows, then each adapter once


def test_a_finished_adapter_is_kept_until_its_settings_change(tiny_model_dir, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model_dir, max_steps=1)
    first = train(recipe, only=["a"], progress=False)
    again = train(recipe, only=["a"], progress=False)
    assert [(s.name, s.action) for s in again.steps if s.name == "a"] == [("a", "kept")]
    assert again.adapters["a"] == first.adapters["a"]
    recipe["defaults"]["lora"]["r"] = 2
    changed = train(recipe, only=["a"], progress=False)
    assert [(s.action, s.reason) for s in changed.steps if s.name == "a"] == [("retrained", "lora.r 4 -> 2")]
    assert changed.adapters["a"]["config"]["lora"]["r"] == 2
    assert [s.action for s in train(recipe, only=["a"], overwrite=True, progress=False).steps
            if s.name == "a"] == ["retrained"]


def test_packed_batch_equals_sequences_one_by_one(tiny_model_dir, tiny_tokenizer):
    """The block-diagonal mask: packing must not let tokens attend across sequences."""
    from loraplex.data.render import chat_template_for, encode

    model = load_model(resolve_base(str(tiny_model_dir)))
    template = chat_template_for(tiny_tokenizer)
    rows = [encode(tiny_tokenizer, [{"role": "user", "content": r["instruction"]},
                                    {"role": "assistant", "content": r["output"]}], template, 256) for r in ROWS[:3]]
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in rows]
    with torch.no_grad():
        packed, n_packed, _ = answer_loss_sum(model, PackedCollator()(feats))
        single = [answer_loss_sum(model, PackedCollator()([f])) for f in feats]
        padded, n_padded, _ = answer_loss_sum(model, PaddedCollator(0)(feats))
    assert n_packed == sum(n for _, n, _ in single) == n_padded
    assert torch.allclose(packed, sum(loss for loss, _, _ in single), rtol=1e-5)
    assert torch.allclose(packed, padded, rtol=1e-5)


RESUME_SCRIPT = """
import json, sys, loraplex
import loraplex.training.runner as runner
from kill_points import die_after_checkpoint

die_after_checkpoint(runner, lambda step: step == 4)  # killed right after its first checkpoint, on any machine
recipe = json.loads(sys.argv[1])
loraplex.train(recipe, only=["a"], progress=False)
"""


def test_resume_after_kill_matches_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_model_dir, max_steps=24, save_steps=4)
    reference = {**recipe, "run_name": "reference"}
    ref = train(reference, only=["a"], progress=False)

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, json.dumps(recipe)], env=env)
    checkpoint = Path(recipe["output_dir"]) / "t" / "checkpoints" / "a" / "checkpoint-4" / "trainer_state.json"
    try:
        code = proc.wait(timeout=240)
    finally:
        proc.kill()
    assert code == -signal.SIGKILL, f"the training was to be killed after its first checkpoint, it exited with {code}"
    assert checkpoint.exists(), "the training never wrote a checkpoint"
    assert not checkpoint.parent.with_name("checkpoint-8").exists()
    adapter_dir = Path(recipe["output_dir"]) / "t" / "adapters" / "a"
    assert not (adapter_dir / "loraplex.json").exists(), "killed before the end, the adapter must not look complete"

    from transformers import Trainer

    started_from, original = [], Trainer.train

    def recording(self, *args, resume_from_checkpoint=None, **kwargs):
        started_from.append(resume_from_checkpoint)
        return original(self, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(Trainer, "train", recording)
    resumed = train(recipe, only=["a"], resume=True, progress=False)
    assert started_from == [str(checkpoint.parent)], "the second run must continue from the checkpoint"
    a = load_file(resumed.run_dir / "adapters" / "a" / "adapter_model.safetensors")
    b = load_file(ref.run_dir / "adapters" / "a" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_loraplex_train_is_the_function():
    import loraplex
    import loraplex.training.runner
    import loraplex.training.trainer  # noqa: F401

    assert loraplex.train is loraplex.training.runner.train
    assert "allow_pickle" in loraplex.train.__code__.co_varnames
