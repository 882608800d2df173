"""`target_modules: auto` on tiny random Llamas: the probe, matched budgets, trials, the cache, errors, the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import write_jsonl
from loraplex import train
from loraplex.errors import RecipeError
from loraplex.models import base_fingerprint, load_model, resolve_base
from loraplex.select import choose
from loraplex.select.split import SelectionSplit
from loraplex.select.trials import Trial, rounds, run_trials, step_cost
from loraplex.targets import candidates, default_budget, matched_alpha, matched_candidates, module_groups
from loraplex.lm.packed import heldout_metrics
from loraplex.select.operation import select

ROWS = [{"instruction": f"Repeat the word {w} {n} times.", "input": "", "output": " ".join([w] * n)}
        for w in ["apple", "river", "stone", "cloud", "amber", "pilot", "maple", "ocean"] for n in range(1, 7)]
LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_recipe(tmp_path: Path, model_dir: Path, auto: dict | None = None, dtype: str = "float32",
                targets="auto") -> dict:
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    return {
        "model": {"path": str(model_dir), "dtype": dtype}, "output_dir": str(tmp_path / "runs"), "run_name": "s",
        "defaults": {"train": {"epochs": 2, "lr": 2e-2, "batch_size": 4, "save_steps": 100, "logging_steps": 1},
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "val_size": 0.25},
        "datasets": [{"name": "a", "path": str(tmp_path / "a.jsonl"), "target_modules": targets,
                      "auto": auto or {}}],
    }


def zeroed_model_dir(source: Path, target: Path, zero: set[str], layers: set[int] = {0, 1}) -> Path:
    """The tiny model with the weights of the `zero` modules set to 0 in `layers` (default: both)."""
    model = LlamaForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in zero and int(name.split(".")[2]) in layers:
                module.weight.zero_()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


# With o_proj = 0 no change of q, k or v reaches the output, and with gate = up = 0 the MLP's input to down_proj
# is 0 and no change of gate or up passes through the SiLU-times-0 product: only o_proj can change the output.
# With v = o = 0 the attention block passes nothing and gets no gradient; with down = 0 only down_proj can.
@pytest.mark.parametrize("only, zero", [("o_proj", {"o_proj", "gate_proj", "up_proj"}),
                                        ("down_proj", {"v_proj", "o_proj", "down_proj"})])
def test_the_probe_ranks_the_only_module_that_can_learn_the_task_first(tmp_path, tiny_model_dir, only, zero):
    model_dir = zeroed_model_dir(tiny_model_dir, tmp_path / "model", zero)
    decision = select(make_recipe(tmp_path, model_dir, {"trials": 0}), progress=False)["a"]
    scores = {c["label"]: c["probe_score"] for c in decision["candidates"]}
    assert decision["winner"] == only and decision["decided_by"] == "probe (auto.trials is 0)"
    assert decision["candidates"][0]["label"] == only
    for c in decision["candidates"]:
        assert (c["probe_score"] > 0) == (only in c["modules"]), (c["label"], scores)


def test_the_probe_measures_only_the_layers_to_transform(tmp_path, tiny_model_dir):
    """Layer 1 as in the down_proj case above, layer 0 untouched: on layer 1 alone only down_proj has a gradient."""
    model_dir = zeroed_model_dir(tiny_model_dir, tmp_path / "model", {"v_proj", "o_proj", "down_proj"}, {1})
    recipe = make_recipe(tmp_path, model_dir, {"trials": 0})
    recipe["defaults"]["lora"]["layers_to_transform"] = [1]
    decision = select(recipe, progress=False)["a"]
    assert decision["winner"] == "down_proj"
    for c in decision["candidates"]:
        assert (c["probe_score"] > 0) == ("down_proj" in c["modules"]), c
    recipe["defaults"]["lora"]["layers_to_transform"] = [0]  # the untouched layer: every module has a gradient
    assert all(c["probe_score"] > 0 for c in select(recipe, progress=False)["a"]["candidates"])


def test_the_probe_is_not_fixed_on_one_answer(tmp_path, tiny_model_dir):
    """The same probe on the untouched model gives every module type a gradient."""
    decision = select(make_recipe(tmp_path, tiny_model_dir, {"trials": 0}), progress=False)["a"]
    assert all(c["probe_score"] > 0 for c in decision["candidates"])
    assert set(decision["probe"]["row_norms"]) == set(LEAVES)


def test_matched_budgets_are_equal_within_half_a_rank_step(tiny_model_dir):
    from loraplex.models import meta_model

    meta = meta_model(resolve_base(str(tiny_model_dir)))
    budget = default_budget(meta, 8)
    assert budget == 8 * 2 * ((64 + 64) + (64 + 32))  # q_proj and v_proj in both layers at r=8
    sets = candidates(meta)
    assert [c.label for c in sets] == LEAVES + ["attention", "mlp", "q_proj+v_proj", "all-linear"]
    for r in (1, 2, 4, 8, 64):  # at r 1 and 2 one rank of all-linear costs over twice the budget; at 64 k_proj
        kept, dropped = matched_candidates(sets, default_budget(meta, r))  # cannot reach it (rank 32 at most)
        for c in kept:
            rank = c.rank_for(default_budget(meta, r))
            assert abs(rank * c.params_per_rank - default_budget(meta, r)) <= c.params_per_rank / 2, (r, c)
        assert set(dropped) == {c.label for c in sets} - {c.label for c in kept}
    assert set(matched_candidates(sets, default_budget(meta, 1))[1]) == {"mlp", "all-linear"}
    assert "4.57x the budget of 448" in matched_candidates(sets, default_budget(meta, 1))[1]["all-linear"]
    assert "rank 32, the most it can have" in matched_candidates(sets, default_budget(meta, 64))[1]["k_proj"]
    assert not matched_candidates(sets, budget)[1]
    model = load_model(resolve_base(str(tiny_model_dir)))
    from peft import LoraConfig, get_peft_model
    for c in sets:  # the counted parameters are those the candidate's LoRA really has
        peft = get_peft_model(load_model(resolve_base(str(tiny_model_dir))),
                              LoraConfig(r=c.rank_for(budget), target_modules=c.target_modules()))
        assert sum(p.numel() for p in peft.parameters() if p.requires_grad) == c.rank_for(budget) * c.params_per_rank
    assert module_groups(model) == {"attention": LEAVES[:4], "mlp": LEAVES[4:]}
    assert matched_alpha(16, 8, 2, False) == 4 and matched_alpha(16, 8, 2, True) == pytest.approx(8)


def test_a_selection_leaves_out_the_sets_that_cannot_meet_the_budget_and_says_why(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, {"trials": 1, "cost": 1.0})
    recipe["defaults"]["lora"]["r"] = 1
    recipe["defaults"]["train"]["epochs"] = 8  # long enough for the trials, which would train all-linear
    decision = select(recipe, progress=False)["a"]
    assert decision["decided_by"] == "trials"
    assert {d["label"] for d in decision["dropped"]} == {"mlp", "all-linear"}
    assert not {"mlp", "all-linear"} & {c["label"] for c in decision["candidates"]}
    for c in decision["candidates"]:
        assert abs(c["params"] - decision["budget"]) <= c["params"] / c["rank"] / 2, c
    recipe["datasets"][0]["auto"]["candidates"] = ["mlp"]
    with pytest.raises(RecipeError, match=r"mlp: rank 1, the least it can have, gives 1,152 parameters"):
        select(recipe, progress=False)


def test_successive_halving_schedule():
    assert rounds(5, 16) == [(4, 5), (8, 3), (16, 2)]
    assert rounds(2, 10) == [(10, 2)]
    assert rounds(4, 3) == [(2, 4), (3, 2)]
    assert step_cost(4) == pytest.approx(4 * 0.5 + 2 * 0.5)


def test_the_trials_add_the_probes_best_set_of_several_modules_and_leave_out_sets_that_cannot_learn(
        tiny_model_dir):
    from loraplex.models import meta_model

    sets = {c.label: c for c in candidates(meta_model(resolve_base(str(tiny_model_dir))))}
    scores = {"o_proj": 6.0, "up_proj": 3.5, "mlp": 3.0, "all-linear": 2.5, "attention": 1.0, "q_proj": 0.0,
              "q_proj+v_proj": 0.0}
    ranked = [sets[label] for label in scores]
    refs = [sets["q_proj+v_proj"], sets["all-linear"]]
    assert [c.label for c in choose._trial_sets(ranked, refs, 2, scores)] == ["o_proj", "mlp", "all-linear", "up_proj"]
    assert [c.label for c in choose._trial_sets(ranked, refs, 0, scores)] == ["o_proj"]
    scores["q_proj+v_proj"] = 0.5  # a reference that can learn is trialled, after the set of several modules
    assert [c.label for c in choose._trial_sets(ranked, refs, 1, scores)] == ["o_proj", "mlp", "q_proj+v_proj",
                                                                              "all-linear"]


def test_trials_that_do_not_fit_on_the_recipes_batches_run_on_smaller_ones(tmp_path, tiny_model_dir, monkeypatch):
    from loraplex.pipeline import open_recipe

    recipe = make_recipe(tmp_path, tiny_model_dir, {"trials": 1, "cost": 0.15, "selection_rows": 8})
    recipe["defaults"]["train"]["epochs"] = 8
    ws = open_recipe(recipe)
    data = ws.prepare()["a"]
    read = rows_read_by_the_selection(monkeypatch)
    decision = choose.choose_modules(load_model(ws.base), ws.recipe.datasets[0], data, "base", None, progress=False)
    trials = decision["trials"]
    assert decision["decided_by"] == "trials" and trials["horizon"] >= choose.MIN_TRIAL_STEPS
    assert trials["batch_size"] < 4  # the recipe's batch of 4 does not fit in 15% of the training
    probe_batches = recipe["datasets"][0]["auto"].get("probe_batches", 2)
    assert read["batch_sizes"][:probe_batches] == [4] * probe_batches
    assert set(read["batch_sizes"][probe_batches:]) == {trials["batch_size"]}
    assert len(read["batch_sizes"]) == probe_batches + trials["horizon"]  # every step's batch is drawn once
    ran = [c for c in decision["candidates"] if c["trial"]]
    assert len(ran) >= 2 and max(c["trial"]["steps"] for c in ran) == trials["horizon"]


def test_the_trial_plan_halves_the_batch_before_it_drops_sets():
    tokens, row_tokens, score_tokens = 1000.0, 10.0, 30.0
    count, batch, horizon = choose._trial_plan(tokens, 3, 8, row_tokens, score_tokens)
    assert batch < 8 and horizon >= choose.MIN_TRIAL_STEPS
    assert all(choose._horizon(tokens, n, batch * 2, row_tokens, score_tokens) < choose.MIN_TRIAL_STEPS
               for n in (2, 3))  # no two trials fit on twice the batch
    assert count == 3 or choose._horizon(tokens, 3, batch, row_tokens, score_tokens) < choose.MIN_TRIAL_STEPS
    assert choose._trial_plan(40.0, 3, 8, row_tokens, score_tokens) is None  # not even two on one row each


def test_trials_keep_the_better_half_see_the_same_batches_and_leave_the_base_alone(tmp_path, tiny_model_dir):
    from loraplex.pipeline import open_recipe

    model_dir = zeroed_model_dir(tiny_model_dir, tmp_path / "model", {"o_proj", "gate_proj", "up_proj"})
    ws = open_recipe(make_recipe(tmp_path, model_dir))
    data = ws.prepare()["a"]
    model = load_model(ws.base)
    before = base_fingerprint(model)
    base_loss = heldout_metrics(model, data.val)["loss"]
    sets = {c.label: c for c in candidates(model)}
    trials = [Trial(sets[name], 4, 8.0) for name in ("q_proj", "k_proj", "o_proj", "gate_proj")]
    done = run_trials(model, ws.recipe.datasets[0], data.train, data.val, trials, horizon=8, micro_batch_tokens=None,
                      progress=False)
    assert base_fingerprint(model) == before and not any("lora" in n for n, _ in model.named_modules())
    by_name = {t.candidate.label: t for t in done}
    assert done[0].candidate.label == "o_proj"  # the only one that can learn
    assert by_name["o_proj"].steps == 8 and sum(t.steps == 8 for t in done) == 2
    assert all(t.steps == 4 for t in done if t.steps != 8)
    first = [t.train_loss[0] for t in done]  # B = 0 before the first step: every trial's first loss is the base's
    assert max(first) - min(first) < 1e-6
    for name in ("q_proj", "k_proj", "gate_proj"):  # they cannot change the output: their loss stays the base's
        assert by_name[name].selection_loss and all(x == pytest.approx(base_loss, abs=1e-6)
                                                    for x in by_name[name].selection_loss)
    assert by_name["o_proj"].selection_loss[-1] < base_loss - 0.1


def test_train_with_auto_trains_the_winner_and_records_the_decision(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, {"cost": 1.0, "trials": 2})
    recipe["defaults"]["train"]["epochs"] = 8  # long enough for three trials of at least MIN_TRIAL_STEPS
    result = train(recipe, progress=False)
    meta = result.adapters["a"]
    decision = meta["selection"]
    assert decision["decided_by"] == "trials" and decision["trials"]["horizon"] >= choose.MIN_TRIAL_STEPS
    trialled = [c for c in decision["candidates"] if c["trial"]]
    assert {"q_proj+v_proj", "all-linear"} <= {c["label"] for c in trialled} and len(trialled) >= 3
    best = min((c for c in trialled if c["trial"]["steps"] == decision["trials"]["horizon"]),
               key=lambda c: c["trial"]["selection_loss"][-1])
    assert decision["winner"] == best["label"]
    config = json.loads((result.run_dir / "adapters" / "a" / "adapter_config.json").read_text())
    modules = config["target_modules"]  # PEFT writes all-linear as the full module names
    assert {m.rsplit(".", 1)[-1] for m in ([modules] if isinstance(modules, str) else modules)} == set(best["modules"])
    assert config["r"] == decision["r"] == best["rank"] and meta["config"]["lora"]["r"] == best["rank"]
    assert meta["trainable_params"] == best["params"]
    assert decision["full_training_s"] > 0 and decision["cached"] is False


def test_a_selection_is_cached_and_reused(tmp_path, tiny_model_dir, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_model_dir, {"trials": 1, "cost": 1.0})
    first = select(recipe, progress=False)["a"]
    assert first["cached"] is False and list(tmp_path.glob("**/selections/*.json"))

    def fail(*args, **kwargs):
        raise AssertionError("the cached decision should have been used")

    monkeypatch.setattr(choose, "probe", fail)
    monkeypatch.setattr(choose, "run_trials", fail)
    again = select(recipe, progress=False)["a"]
    assert again["cached"] is True and again["winner"] == first["winner"] and again["candidates"] == first["candidates"]
    recipe["defaults"]["lora"]["r"] = 2  # another budget: another question
    with pytest.raises(AssertionError, match="cached decision"):
        select(recipe, progress=False)
    recipe["defaults"]["lora"]["r"] = 4
    recipe["defaults"]["max_samples"] = 40  # the same file, other rows: another question too
    with pytest.raises(AssertionError, match="cached decision"):
        select(recipe, progress=False)


def rows_read_by_the_selection(monkeypatch) -> dict[str, list[tuple]]:
    """As token ids: every row that reaches the model in a batch ("seen": the probe's, the trials' and their
    scoring passes), every row a trial trains on ("fit"), every row a trial is scored on ("scored"), and the
    number of rows of each training batch ("batch_sizes")."""
    from loraplex.select import trials
    from loraplex.lm.packed import PackedCollator

    read: dict[str, list] = {"seen": [], "fit": [], "scored": [], "batch_sizes": []}
    collate, rows_of, metrics = PackedCollator.__call__, trials.Batches.rows_of, trials.heldout_metrics

    def recorded_collate(self, features):
        read["seen"] += [tuple(f["input_ids"]) for f in features]
        return collate(self, features)

    def recorded_rows_of(self, step):
        rows = rows_of(self, step)
        read["fit"] += [tuple(r["input_ids"]) for r in rows]
        read["batch_sizes"].append(len(rows))
        return rows

    def recorded_metrics(model, dataset, *args, **kwargs):
        read["scored"] += [tuple(ids) for ids in dataset["input_ids"]]
        return metrics(model, dataset, *args, **kwargs)

    monkeypatch.setattr(PackedCollator, "__call__", recorded_collate)
    monkeypatch.setattr(trials.Batches, "rows_of", recorded_rows_of)
    monkeypatch.setattr(trials, "heldout_metrics", recorded_metrics)
    return read


def check_no_held_out_row_read(read: dict[str, list], data) -> None:
    """The selection's rows against the dataset's splits: no held-out row reached the model; trials were scored on
    training rows they did not train on."""
    heldout = {tuple(ids) for ids in data.val["input_ids"]}
    train = {tuple(ids) for ids in data.train["input_ids"]}
    assert read["fit"] and read["scored"] and read["seen"] and len(heldout) == 12
    assert not heldout & set(read["seen"]), "the selection read held-out rows"
    assert set(read["scored"]) <= train
    assert not set(read["fit"]) & set(read["scored"]), "a trial was scored on rows it trained on"


def selection_with_recorded_rows(tmp_path, model_dir, monkeypatch):
    """(the decision, the rows it read, the prepared dataset) of a selection whose trials run."""
    from loraplex.pipeline import open_recipe

    recipe = make_recipe(tmp_path, model_dir, {"trials": 1, "cost": 1.0, "selection_rows": 8})
    recipe["defaults"]["train"]["epochs"] = 8  # long enough for the trials
    ws = open_recipe(recipe)
    data = ws.prepare()["a"]
    read = rows_read_by_the_selection(monkeypatch)
    decision = choose.choose_modules(load_model(ws.base), ws.recipe.datasets[0], data, "base", None, progress=False)
    return decision, read, data


def test_the_selection_never_reads_a_held_out_row_nor_scores_on_rows_it_trained_on(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    decision, read, data = selection_with_recorded_rows(tmp_path, tiny_model_dir, monkeypatch)
    assert decision["decided_by"] == "trials"
    check_no_held_out_row_read(read, data)
    assert len(set(read["scored"])) == 8 == decision["rows"]["trials_scored_on"]


def _score_on_held_out_rows(monkeypatch, data):
    split = choose.selection_split
    monkeypatch.setattr(choose, "selection_split", lambda train, rows, min_fit: SelectionSplit(
        split(train, rows, min_fit).fit, data.val))


def _probe_held_out_rows(monkeypatch, data):
    probe = choose.probe
    monkeypatch.setattr(choose, "probe", lambda model, rows, *args: probe(model, rows + [data.val[0]], *args))


@pytest.mark.parametrize("peek", [_score_on_held_out_rows, _probe_held_out_rows])
def test_a_selection_that_peeks_at_held_out_rows_is_caught(tmp_path, tiny_model_dir, monkeypatch, peek):
    """The check above against planted faults: trials scored on the held-out split; a probe fed one held-out row."""
    from loraplex.pipeline import open_recipe

    recipe = make_recipe(tmp_path, tiny_model_dir)
    peek(monkeypatch, open_recipe(recipe).prepare()["a"])
    decision, read, data = selection_with_recorded_rows(tmp_path, tiny_model_dir, monkeypatch)
    assert decision["decided_by"] == "trials"
    with pytest.raises(AssertionError, match="held-out rows"):
        check_no_held_out_row_read(read, data)


def test_a_decision_does_not_change_when_the_held_out_rows_are_poisoned(tmp_path, tiny_model_dir):
    """The same training rows with two different held-out files: one of them another task entirely."""
    poison = [{"instruction": f"Say {w} backwards.", "input": "", "output": w[::-1] * 3}
              for w in ["apple", "river", "stone", "cloud", "amber", "pilot"]]
    decisions = []
    for name, rows in (("clean", ROWS[::4]), ("poisoned", poison)):
        recipe = make_recipe(tmp_path, tiny_model_dir, {"trials": 2, "cost": 1.0})
        recipe["defaults"]["train"]["epochs"] = 8  # long enough for the trials
        recipe["datasets"][0]["val_path"] = str(write_jsonl(tmp_path / f"{name}.jsonl", rows))
        decisions.append(select(recipe, progress=False)["a"])
    clean, poisoned = decisions
    assert clean["decided_by"] == "trials" and clean["cached"] is False and poisoned["cached"] is False
    assert [c["trial"] for c in clean["candidates"]] == [c["trial"] for c in poisoned["candidates"]]
    assert clean["winner"] == poisoned["winner"] and clean["candidates"] == poisoned["candidates"]


def test_a_composed_adapter_is_selected_in_the_model_it_trains_in(tmp_path, tiny_model_dir):
    """With o_proj = 0 in the base, q, k and v get no gradient and cannot learn, until an adapter on o_proj opens
    the attention path: selected with that adapter active (and frozen), q_proj+v_proj can learn."""
    model_dir = zeroed_model_dir(tiny_model_dir, tmp_path / "model", {"o_proj"})
    recipe = make_recipe(tmp_path, model_dir, {"trials": 1, "cost": 1.0})
    recipe["defaults"]["train"]["epochs"] = 8  # long enough for the trials
    second = {**recipe["datasets"][0], "name": "second", "compose_with": ["opener"]}
    recipe["datasets"][0].update(name="opener", target_modules=["o_proj"])
    recipe["datasets"].append(second)
    result = train(recipe, progress=False)  # the isolation check after each adapter covers the selection too
    composed = (result.run_dir / "adapters" / "opener" / "adapter_model.safetensors").read_bytes()
    decision = result.adapters["second"]["selection"]
    assert decision["decided_by"] == "trials" and set(decision["composed_with"]) == {"opener"}
    scores = {c["label"]: c["probe_score"] for c in decision["candidates"]}
    assert scores["q_proj"] > 0 and scores["v_proj"] > 0, scores  # 0 on the pristine base
    qv = next(c["trial"] for c in decision["candidates"] if c["label"] == "q_proj+v_proj")
    from loraplex.pipeline import open_recipe
    from loraplex.select.split import selection_split

    ws = open_recipe(recipe)
    scored = selection_split(ws.prepare()["second"].train, 16, 4).score
    pristine = heldout_metrics(load_model(ws.base), scored)["loss"]  # what q_proj+v_proj keep on the pristine base
    assert abs(qv["selection_loss"][0] - pristine) > 0.1, (qv, pristine)
    assert (result.run_dir / "adapters" / "opener" / "adapter_model.safetensors").read_bytes() == composed
    assert result.adapters["second"]["compose_with"] == decision["composed_with"]  # the same weights, by hash


@pytest.mark.parametrize("auto, message", [
    ({"candidates": ["q_prj"]}, "'q_prj' is not a linear module of LlamaForCausalLM; did you mean 'q_proj'?"),
    ({"candidates": []}, "auto.candidates: empty"),
    ({"candidates": [[]]}, "an empty set"),
    ({"trials": -1}, "auto.trials: input should be greater than or equal to 0"),
    ({"budget": 0}, "auto.budget: input should be greater than 0"),
    ({"cost": 1.5}, "auto.cost: input should be less than or equal to 1"),
    ({"probes": 2}, "datasets[a].auto.probes: unknown key 'probes'; did you mean 'probe_batches'?"),
])
def test_bad_auto_settings_get_clear_errors(tmp_path, tiny_model_dir, auto, message):
    with pytest.raises(RecipeError) as info:
        select(make_recipe(tmp_path, tiny_model_dir, auto), progress=False)
    assert message in str(info.value)


def test_auto_needs_no_held_out_split_and_says_when_the_training_rows_are_too_few_for_trials(tmp_path,
                                                                                             tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, {"trials": 1, "cost": 1.0})
    recipe["defaults"]["val_size"] = 0
    recipe["defaults"]["train"]["epochs"] = 8  # long enough for the trials
    decision = select(recipe, progress=False)["a"]
    assert decision["decided_by"] == "trials" and decision["rows"]["trials_scored_on"] == 16
    recipe["datasets"][0]["auto"]["selection_rows"] = 46  # of 48 rows: 2 left, fewer than a batch of 4
    decision = select(recipe, progress=False)["a"]
    assert decision["decided_by"] == "probe (48 training rows: too few to score trials on auto.selection_rows = 46 " \
                                     "and train them on a batch of others)"
    assert decision["rows"]["trials_scored_on"] == 0 and decision["rows"]["fit"] == 48


def test_user_candidates_and_groups(tmp_path, tiny_model_dir):
    decision = select(make_recipe(tmp_path, tiny_model_dir, {"candidates": ["q_proj+k_proj", ["v_proj"], "mlp"],
                                                             "trials": 0}), progress=False)["a"]
    assert {c["label"] for c in decision["candidates"]} == {"q_proj+k_proj", "v_proj", "mlp"}
    assert decision["winner"] in {"q_proj+k_proj", "v_proj", "mlp"}


def test_cli_select_prints_the_decision_table(tmp_path, tiny_model_dir):
    import yaml
    from typer.testing import CliRunner
    from loraplex.cli import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(make_recipe(tmp_path, tiny_model_dir, {"trials": 0})))
    out = CliRunner().invoke(app, ["select", str(path)])
    assert out.exit_code == 0, out.output
    assert "a: modules at a budget of" in out.output and "✓" in out.output and "decided by probe" in out.output
    out = CliRunner().invoke(app, ["select", str(path), "--json"])
    assert json.loads(out.output)["a"]["cached"] is True


@pytest.mark.parametrize("dtype, quantization", [("bfloat16", None), ("float32", "4bit"), ("bfloat16", "4bit")])
def test_auto_in_every_precision_trains_the_winner_on_an_untouched_base(tmp_path, tiny_model_dir, dtype,
                                                                         quantization):
    """The probe's gradients and the trials run on a bf16 and a 4-bit base too (forced dtype: the same on every CPU)."""
    if quantization:
        from test_qlora import BNB_PROBLEM
        if BNB_PROBLEM:
            pytest.skip(f"bitsandbytes cannot run 4-bit here: {BNB_PROBLEM}")
    recipe = make_recipe(tmp_path, tiny_model_dir, {"cost": 1.0, "trials": 1}, dtype=dtype)
    recipe["model"]["quantization"] = quantization
    recipe["defaults"]["train"]["epochs"] = 8
    meta = train(recipe, progress=False).adapters["a"]  # the isolation check after training covers the selection
    decision = meta["selection"]
    assert decision["decided_by"] == "trials"
    assert all(c["probe_score"] > 0 and math.isfinite(c["probe_score"]) for c in decision["candidates"])
    assert all(math.isfinite(x) for c in decision["candidates"] if c["trial"] for x in c["trial"]["selection_loss"])
    assert meta["heldout_loss"] < meta["heldout_loss_base"] and meta["dtype"] == dtype
    assert meta["trainable_params"] == next(c["params"] for c in decision["candidates"]
                                            if c["label"] == decision["winner"])
