"""The eval matrix decodes every model's greedy answers in shared mixed-adapter batches (`lm.decoding`): the
answers and held-out losses must be those of each model run on its own, one `model.generate` call at a time."""
from __future__ import annotations

import pytest
import torch

from loraplex.adapters import load
from loraplex.data.render import chat_template_for, end_of_turn_ids
from loraplex.evaluation import GenerationSettings, evaluate_run, load_test_split
from loraplex.lm.decoding import complete_text
from loraplex.lm.packed import heldout_metrics
from loraplex.models import stop_token_ids
from loraplex.run import adapter_dir, open_run
from test_evaluate import make_run_recipe

MAX_NEW = 8
# 3 rows at a time over 4 models x 2 test splits x 5 prompts: rows leave and join the running batch
SETTINGS = GenerationSettings(max_new_tokens=MAX_NEW, batch_size=3, max_examples=5, samples=5, cross=True)


@torch.no_grad()
def one_model_answers(model, tokenizer, prompts: list[str], eos: set[int]) -> list[str]:
    """The per-model path: `model.generate`, greedy, the prompts left-padded together. An answer cut by
    max_new_tokens inside a character ends without its incomplete bytes, as the server sends it (`complete_text`)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1, eos_token_id=sorted(eos),
                         pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    return [complete_text(text).strip() for text in tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    from loraplex import train

    tmp = tmp_path_factory.mktemp("batched")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(tmp / "home"))
        run_dir = train(make_run_recipe(tmp, tiny_model_dir), progress=False).run_dir
        yield run_dir, evaluate_run(run_dir, generation=SETTINGS)


def test_batched_matrix_equals_each_model_on_its_own(trained, monkeypatch):
    run_dir, matrix = trained
    monkeypatch.setenv("LORAPLEX_HOME", str(run_dir.parent.parent / "home"))
    ws = open_run(run_dir)
    names = [spec.name for spec in ws.recipe.datasets]
    adapters = load(ws.base, {name: adapter_dir(run_dir, name) for name in names}, dtype=torch.float32)
    model, tokenizer, prepared = adapters.model.eval(), adapters.tokenizer, ws.prepare()
    eos = stop_token_ids(model, tokenizer) | set().union(
        *(end_of_turn_ids(tokenizer, chat_template_for(tokenizer, spec.template)) for spec in ws.recipe.datasets))
    tested = [spec for spec in ws.recipe.datasets if spec.test_path]
    answers: dict[tuple[str, str], list[str]] = {}
    for label, adapter in [("base", None), *((name, name) for name in names)]:
        adapters.use(adapter)
        for spec in tested:
            prompts = load_test_split(spec, ws.recipe, tokenizer, SETTINGS.max_examples).prompts
            answers[label, spec.name] = expected = one_model_answers(model, tokenizer, prompts, eos)
            batched = [sample["outputs"][label] for sample in matrix.samples[spec.name]]
            assert batched == expected, (label, spec.name)
        for name in names:
            alone = heldout_metrics(model, prepared[name].val)
            cell = matrix.metrics[label][name]
            assert cell["loss"] == pytest.approx(alone["loss"], rel=1e-5, abs=1e-6), (label, name)
            assert cell["token_accuracy"] == pytest.approx(alone["token_accuracy"])
    # the models answer differently, so an answer decoded with another row's adapter would show
    for spec in tested:
        assert len({tuple(answers[label, spec.name]) for label in ("base", *names)}) >= 3, spec.name


def test_eval_answers_stop_where_the_server_stops(trained, monkeypatch, tmp_path):
    """Greedy answers end at the model's eos and at every dataset template's end-of-turn token, as served."""
    import shutil

    run_dir, _ = trained
    monkeypatch.setenv("LORAPLEX_HOME", str(run_dir.parent.parent / "home"))
    copy = tmp_path / "ev"
    shutil.copytree(run_dir, copy)
    seen = []

    def record(model, tokenizer, jobs, eos, *args):
        seen.append((set(eos), {job.entry.adapter for job in jobs}))
        return ["x"] * len(jobs)

    monkeypatch.setattr("loraplex.evaluation.greedy_answers", record)
    evaluate_run(copy, generation=SETTINGS)
    ws = open_run(copy)
    expected = stop_token_ids(load(ws.base).model, ws.tokenizer) | set().union(
        *(end_of_turn_ids(ws.tokenizer, chat_template_for(ws.tokenizer, spec.template)) for spec in ws.recipe.datasets))
    assert seen == [(expected, {None, "en", "en_all", "zh"})]  # one shared decoding for the base and the adapters
