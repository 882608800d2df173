"""`loraplex demo`: the whole job on the embedded default model and generated data, on a CPU.

1. writes three generated datasets (English, Chinese, Japanese; see loraplex.demo.data) and a recipe
   that puts Chinese on q_proj, English and Japanese on v_proj, plus two more adapters on the Chinese
   data for comparison: all-linear, and `target_modules: auto` (the modules measured on the data);
2. prepares and trains one adapter per dataset against the untouched base;
3. merges the zh and en adapters (disjoint modules) into one standalone model, verified, at weights searched on
   half of their held-out rows (`--method weights-search`; the other half reports what the merge keeps);
4. evaluates base, each adapter and the merged model (held-out loss; exact match on the test split,
   greedy and batched) and writes report.md / report.html into the run folder.
"""
from __future__ import annotations

import copy
import math
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import yaml

from ..atomic import atomic_dir, atomic_write_json, atomic_write_text
from .data import DEMO_ADAPTERS, demo_checkers, demo_file, write_demo_data
from ..errors import ParameterError
from ..evaluation import evaluate_run
from ..merging import merge
from ..recipe import DATASET_NAME_PATTERN, load_recipe
from ..reporting import write_report
from ..run import merged_dir, writer_lock
from ..timing import collect_phases
from ..training.runner import train

DEMO_RECIPE, DEMO_RESULTS = "demo.yaml", "demo_results.json"  # in the run folder, beside what `train` writes
DEMO_SYSTEM = "You are a helpful assistant."
MERGED = ("zh", "en")  # disjoint modules (q_proj, v_proj): their merge is an exact sum
MERGE_METHOD = "weights-search"  # the plain sum kept 43% / 53% of zh's / en's gain there, this 92% / 83%
# sized for a 2-core CPU: 20 steps of 8 rows per adapter, 13 to 20 s each in bfloat16 on AVX512-BF16, 25 to 40 s in
# float32 on AVX2; each adapter still far past the demo's targets (held-out loss -30%, exact match +20 points)
DEMO_SIZES = {"n_train": 160, "n_val": 24, "n_test": 30}


def demo_recipe(seed: int = 0, run_name: str = "demo") -> dict:
    """The demo's recipe, to be written into the run folder `<...>/<run_name>/demo.yaml`."""
    datasets = []
    for name, (data, targets) in DEMO_ADAPTERS.items():
        datasets.append({"name": name, "path": demo_file(data, "train"), "val_path": demo_file(data, "val"),
                         "test_path": demo_file(data, "test"), "target_modules": targets})
    return {
        "model": {"path": "default", "dtype": "auto"},
        "run_name": run_name, "output_dir": "..",  # the run folder is the recipe's own folder
        "defaults": {
            "system": DEMO_SYSTEM, "max_seq_length": 128,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "train": {"epochs": 1, "lr": 2.0e-3, "batch_size": 8, "warmup_ratio": 0.1, "scheduler": "linear",
                      "seed": seed, "logging_steps": 2, "save_steps": 20},
        },
        "datasets": datasets,
    }


def run_demo(out_dir: Path = Path("runs/demo"), seed: int = 0, overrides: list[str] | None = None,
             sizes: dict[str, int] | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
    """Generate data, train every adapter, merge zh+en, evaluate, write the report; returns the summary.

    `overrides` are dotted recipe overrides (`model.path=...`, `defaults.train.max_steps=2`).
    """
    log = log or (lambda message: None)
    out_dir = Path(out_dir).expanduser().resolve()
    if not re.match(DATASET_NAME_PATTERN, out_dir.name):
        raise ParameterError("out_dir", f"{out_dir}: the run folder's name becomes the run name and may hold only "
                            "letters, digits, '_', '.' and '-' (not starting with one of the last three)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / DEMO_RECIPE).is_file():
        raise ParameterError("out_dir", f"{out_dir} exists and was not made by `loraplex demo`; choose a new or "
                             "empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    with writer_lock(out_dir, ["demo"], "loraplex demo"):
        return _run_demo(out_dir, seed, overrides, sizes, progress, log)


def _run_demo(out_dir: Path, seed: int, overrides: list[str] | None, sizes: dict[str, int] | None, progress: bool,
              log: Callable[[str], None]) -> dict:
    started, steps = time.perf_counter(), {}
    recipe = demo_recipe(seed, out_dir.name)
    with _step(steps, "data"):
        with atomic_dir(out_dir / "data") as tmp:  # the previous data stays whole until the new data is complete...
            write_demo_data(tmp, seed=seed, **(sizes or DEMO_SIZES))
            _check_overrides(recipe, tmp, overrides)  # ...and the overrides are valid
        recipe_path = out_dir / DEMO_RECIPE
        atomic_write_text(recipe_path, "# written by `loraplex demo`\n" +
                          yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
        loaded = load_recipe(recipe_path, overrides)
    with _step(steps, "train"):
        result = train(loaded, progress=progress, say=log)
    merged_model = merged_dir(result.run_dir, "+".join(MERGED))
    log(f"merging zh (q_proj) and en (v_proj) into one model with method={MERGE_METHOD!r} (benchmarks/"
        "merge_retention.py: the merge of these adapters that keeps the most of the one that keeps least)")
    with _step(steps, "merge"):
        merge_report = merge(result.run_dir, list(MERGED), method=MERGE_METHOD, out_dir=merged_model,
                             overwrite=True, echo=log)
    log("evaluating base, adapters and the merged model")
    with _step(steps, "evaluate"):
        evaluation = evaluate_run(result.run_dir, merged=[merged_model], checkers=demo_checkers(loaded), log=log,
                                  generation={"max_new_tokens": 24, "batch_size": 40, "cross": False}).as_dict()
    with _step(steps, "report"):
        html = write_report(result.run_dir).html
    summary = {"seed": seed, "run_dir": str(result.run_dir), "report": str(html),
               "merged": {"dir": str(merged_model), "adapters": list(MERGED), "method": MERGE_METHOD,
                          "weights": {a.name: a.weight for a in merge_report.adapters},
                          "verification": _verification(merge_report.as_dict())},
               "results": demo_rows(evaluation, result.adapters, merged_label=_merged_label(evaluation)),
               "timings": time_breakdown(steps, _trained_walls(result), time.perf_counter() - started)}
    atomic_write_json(result.run_dir / DEMO_RESULTS, summary)
    return summary


@contextmanager
def _step(steps: dict[str, dict], name: str) -> Iterator[None]:
    """Time one step of the demo, with the named phases (`loraplex.timing`) that ran inside it."""
    started = time.perf_counter()
    with collect_phases() as phases:
        yield
    steps[name] = {"seconds": time.perf_counter() - started, "phases": dict(phases)}


def _trained_walls(result) -> dict[str, float]:
    """Seconds in the training loop of each adapter this run trained (a kept adapter took none)."""
    trained = {step.name for step in result.steps if step.trains}
    return {name: meta["wall_time_s"] for name, meta in result.adapters.items() if name in trained}


def time_breakdown(steps: dict[str, dict], walls: dict[str, float], total: float) -> list[dict]:
    """Where the demo's time went, as [{"phase", "seconds"}]: phases summed over the steps they ran in (model
    loads, tokenization), each step's remainder named after what else it does; the rows add up to `total`."""
    def inner(step: str, name: str) -> float:
        return steps[step]["phases"].get(name, 0.0)

    def spent(step: str, *names: str) -> float:
        return sum(inner(step, name) for name in names)

    common = ("prepare", "model load")
    rows = [("prepare: data written, recipe checked, tokenized", steps["data"]["seconds"] +
             sum(spent(s, "prepare") for s in steps)),
            ("model loads (train, merge, its check, eval)", sum(spent(s, "model load") for s in steps)),
            ("selection (target_modules: auto)", inner("train", "selection"))]
    rows += [(f"training {name}", wall) for name, wall in walls.items()]
    rows += [("training: other (recipe opened, adapters saved and reloaded, isolation checks)",
              steps["train"]["seconds"] - spent("train", *common, "selection") - sum(walls.values())),
             ("merge: weight search", inner("merge", "weight search")),
             ("merge: writing and verifying", steps["merge"]["seconds"] - spent("merge", *common, "weight search"))]
    evaluation = ("evaluation: held-out losses", "evaluation: generation", "evaluation: routing")
    rows += [(name, inner("evaluate", name)) for name in evaluation]
    rows += [("evaluation: test splits, scores, eval.json",
              steps["evaluate"]["seconds"] - spent("evaluate", *common, *evaluation)),
             ("report", steps["report"]["seconds"])]
    rows.append(("other", total - sum(seconds for _, seconds in rows)))
    return [{"phase": name, "seconds": round(seconds, 2)} for name, seconds in rows] + \
        [{"phase": "total", "seconds": round(total, 2)}]


def _check_overrides(recipe: dict, data_dir: Path, overrides: list[str] | None) -> None:
    """Validate the demo's recipe with `overrides` against the data in `data_dir` (raises RecipeError)."""
    staged = copy.deepcopy(recipe)
    for entry in staged["datasets"]:
        for which in ("path", "val_path", "test_path"):
            entry[which] = str(data_dir / Path(entry[which]).relative_to("data"))
    load_recipe(staged, overrides)


def demo_rows(evaluation: dict, adapters: dict[str, dict], merged_label: str | None) -> list[dict]:
    """Per dataset: base vs its own adapter (and the merged model where it holds that adapter)."""
    metrics = evaluation["metrics"]
    rows = []
    for name, meta in adapters.items():
        base, own = metrics["base"][name], metrics[name][name]
        merged = metrics[merged_label][name] if merged_label and name in MERGED else None
        rows.append({
            "dataset": name, "target_modules": meta["config"]["target_modules"], "auto": "selection" in meta,
            "trainable_params": meta["trainable_params"], "wall_time_s": meta["wall_time_s"],
            "heldout_loss_base": base["loss"], "heldout_loss_adapter": own["loss"],
            "exact_match_base": base.get("exact_match"), "exact_match_adapter": own.get("exact_match"),
            "heldout_loss_merged": merged["loss"] if merged else None,
            # a searched merge is scored on the held-out rows its search never read: the adapter on those rows
            "heldout_loss_adapter_same_rows": merged.get("same_rows_adapter") if merged else None,
            "heldout_rows_merged": merged.get("heldout_examples") if merged else None,
            "exact_match_merged": merged.get("exact_match") if merged else None,
        })
    return rows


def _merged_label(evaluation: dict) -> str | None:
    return next((r["name"] for r in evaluation["rows"] if r["kind"] == "merged"), None)


def _verification(report: dict) -> dict:
    return {**report["verification"], "heldout": report.get("heldout")}


def targets_met(row: dict) -> dict[str, bool]:
    """The demo's promises per dataset: loss at least 30% below base, exact match +20 points."""
    base, adapted = row["heldout_loss_base"], row["heldout_loss_adapter"]
    loss_ok = adapted is not None and not math.isnan(adapted) and adapted <= 0.7 * base
    em_ok = None not in (row["exact_match_base"], row["exact_match_adapter"]) and \
        row["exact_match_adapter"] - row["exact_match_base"] >= 0.2
    return {"loss_-30%": loss_ok, "exact_match_+20pt": em_ok}
