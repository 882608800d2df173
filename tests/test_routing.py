"""`model: auto` measured: how often the router sends a dataset's held-out prompts to an adapter trained on it, and
the router's own rules (a single adapter, abstaining far from every adapter's data, what it is built from)."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_jsonl
from loraplex import train
from loraplex.cli import app
from loraplex.evaluation import evaluate_run

EN_WORDS = ["apple", "river", "stone", "cloud", "amber", "pilot", "table", "green", "music", "ocean", "paper", "tiger",
            "bread", "chair", "light", "horse", "glass", "money", "night", "plant", "sugar", "train", "water", "zebra",
            "candle", "forest", "garden", "island", "jacket", "kettle"]
ZH_WORDS = ["苹果", "河流", "石头", "云朵", "琥珀", "飞行", "桌子", "绿色", "音乐", "海洋", "纸张",
            "老虎", "面包", "椅子", "灯光", "马匹", "玻璃", "金钱", "夜晚", "植物", "糖果", "火车",
            "清水", "斑马", "蜡烛", "森林", "花园", "岛屿",
            "夹克", "水壶"]
# every row its own word: held-out prompts are never training prompts
ENGLISH = [{"instruction": f"Please repeat the English word {w} twice.", "input": "", "output": f"{w} {w}"}
           for w in EN_WORDS]
CHINESE = [{"instruction": f"请把这个词重复两遍：{w}", "input": "", "output": f"{w}{w}"} for w in ZH_WORDS]


def measured(evaluation: dict, name: str) -> int:
    """Held-out rows routing accuracy is measured on: every other one (val_size 0.2 of 30 by content hash, about 6);
    the rest calibrate the router."""
    return next(c["heldout_examples"] for c in evaluation.columns if c["name"] == name) // 2


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    write_jsonl(tmp / "en.jsonl", ENGLISH)
    write_jsonl(tmp / "zh.jsonl", CHINESE)
    recipe = {"model": {"path": str(tiny_model_dir), "dtype": "float32"}, "output_dir": str(tmp / "runs"),
              "run_name": "r", "defaults": {"train": {"max_steps": 6, "lr": 3e-2, "batch_size": 8},
                                            "lora": {"r": 4, "alpha": 8}, "val_size": 0.2},
              "datasets": [{"name": "en", "path": str(tmp / "en.jsonl"), "target_modules": ["q_proj"]},
                           {"name": "zh", "path": str(tmp / "zh.jsonl"), "target_modules": ["v_proj"]},
                           {"name": "en_mlp", "path": str(tmp / "en.jsonl"), "target_modules": ["up_proj"]}]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(tmp / "home"))
        result = train(recipe, progress=False)
        return result, evaluate_run(result.run_dir, generation={"enabled": False}), tmp / "home"


@pytest.fixture(scope="module")
def prepared_and_base(run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from loraplex.run import open_run

    result, _, home = run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(home))
        prepared = open_run(result.run_dir).prepare()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return prepared, base


def test_held_out_prompts_are_routed_to_their_datasets_adapter(run):
    result, evaluation, _ = run
    routing = evaluation.routing
    # en and en_mlp share a data file: one centroid, routed to the one with the lower held-out loss
    best_en = min(("en", "en_mlp"), key=lambda n: result.adapters[n]["heldout_loss"])
    assert routing["routes_to"] == sorted([best_en, "zh"])
    for name, right in (("en", {"en", "en_mlp"}), ("zh", {"zh"}), ("en_mlp", {"en", "en_mlp"})):
        cell = routing["datasets"][name]
        assert set(cell["right"]) == right and cell["prompts"] == measured(evaluation, name) >= 2
        assert cell["accuracy"] == 1.0, cell  # English and Chinese prompts are far apart for any base
        assert sum(cell["routed"].values()) == measured(evaluation, name) and set(cell["routed"]) <= right | {"base"}


def test_eval_command_prints_the_routing_row(run):
    result, evaluation, _ = run
    done = CliRunner().invoke(app, ["eval", str(result.run_dir), "--no-generate"])
    assert done.exit_code == 0, done.output
    flat = " ".join(done.output.split())
    assert "auto: routed to its" in flat
    assert all(f"100% of {measured(evaluation, name)}" in flat for name in ("en", "zh", "en_mlp"))


def build(prepared, base, names, embedded=None):
    from loraplex.routing import Router, mean_hidden_states

    def embed(prompts):
        if embedded is not None:
            embedded.extend(tuple(ids) for ids in prompts)
        return mean_hidden_states(base, prompts)

    files = {name: (f"{name}.jsonl",) for name in names}
    return Router.build(embed, {n: prepared[n] for n in names}, files, {n: 1.0 for n in names})


def prompts_of(rows):
    from loraplex.routing import prompt_ids

    return [prompt_ids(r["input_ids"], r["labels"]) for r in rows]


def test_a_single_adapter_routes_its_own_prompts_and_abstains_far_from_them(prepared_and_base):
    """With one adapter the old centred centroid was zero and every prompt went to the base; now its held-out
    prompts go to it and an English prompt to a Chinese-only adapter goes to the base."""
    from loraplex.routing import measured_rows

    prepared, base = prepared_and_base
    router = build(prepared, base, ["zh"])
    chinese = prompts_of(measured_rows(prepared["zh"].val))
    assert [router.route_ids(ids)[0] for ids in chinese] == ["zh"] * len(chinese)
    english = prompts_of(prepared["en"].val) + prompts_of(prepared["en"].train)[:10]
    assert [router.route_ids(ids)[0] for ids in english] == ["base"] * len(english)


def test_the_router_is_calibrated_on_rows_its_accuracy_does_not_use(prepared_and_base, monkeypatch):
    """Centroids come from training rows spread over the whole split; the radii from every other held-out row;
    the rows accuracy is measured on are never embedded while the router is built."""
    from loraplex import routing
    from loraplex.routing import calibration_rows, measured_rows

    prepared, base = prepared_and_base
    monkeypatch.setattr(routing, "PROMPTS_PER_ADAPTER", 4)
    embedded: list[tuple] = []
    build(prepared, base, ["en"], embedded)
    train_prompts = [tuple(p) for p in prompts_of(prepared["en"].train)]
    assert train_prompts[0] in embedded and train_prompts[-1] in embedded  # the first and the last, not the first 4
    assert sum(p in embedded for p in train_prompts) == 4
    assert all(tuple(p) in embedded for p in prompts_of(calibration_rows(prepared["en"].val)))
    assert not any(tuple(p) in embedded for p in prompts_of(measured_rows(prepared["en"].val)))


def test_prompts_embedded_together_equal_each_embedded_alone(prepared_and_base):
    """Packed several to a row, each prompt attends only to itself: its vector is the one it gets alone (and the
    plain mean of the base's last hidden states over it), whatever the row it shares."""
    from loraplex.lm.packed import final_hidden_states
    from loraplex.routing import _prompts, mean_hidden_states

    prepared, base = prepared_and_base
    prompts = _prompts(prepared["en"].train)[:5] + _prompts(prepared["zh"].train)[:5]
    widest = max(map(len, prompts))
    together = mean_hidden_states(base, prompts, max_tokens=3 * widest)  # rows of two or three prompts
    alone = torch.cat([mean_hidden_states(base, [ids]) for ids in prompts])
    assert together.shape == (len(prompts), base.config.hidden_size)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), final_hidden_states(base) as captured:
        base(input_ids=torch.tensor([prompts[-1]]), use_cache=False)
    torch.testing.assert_close(together[-1], captured[0][0].mean(0), atol=1e-5, rtol=1e-5)
