"""`loraplex demo`: the whole job on the embedded default model and generated data, on a CPU.

1. writes three generated datasets (English, Chinese, Japanese; see loraplex.data.demo) and a recipe
   that puts Chinese on q_proj, English and Japanese on v_proj, plus a fourth adapter on the Chinese
   data with all-linear for comparison;
2. prepares and trains one adapter per dataset against the untouched base;
3. evaluates base vs each adapter: held-out loss and exact match on the test split (greedy, batched).
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from .adapters import AdapterSet, load
from .atomic import atomic_write_json, atomic_write_text
from .data.demo import check_answer, write_demo_data
from .data.formats import iter_raw_rows, to_messages
from .data.render import chat_template_for, prompt_text
from .evaluate import generate
from .recipe import load_recipe
from .train import train

DEMO_SYSTEM = "You are a helpful assistant."
DEMO_SIZES = {"n_train": 320, "n_val": 40, "n_test": 40}  # sized for a 2-core CPU: about 2 minutes per adapter
# dataset entry -> (demo data set, target modules)
DEMO_ADAPTERS = {"zh": ("zh", ["q_proj"]), "en": ("en", ["v_proj"]), "ja": ("ja", ["v_proj"]),
                 "zh_all": ("zh", "all-linear")}


def demo_recipe(seed: int = 0) -> dict:
    datasets = []
    for name, (data, targets) in DEMO_ADAPTERS.items():
        datasets.append({"name": name, "path": f"data/{data}/train.jsonl", "val_path": f"data/{data}/val.jsonl",
                         "test_path": f"data/{data}/test.jsonl", "target_modules": targets})
    return {
        "model": {"path": "default", "dtype": "auto"},
        "run_name": "demo", "output_dir": "..",
        "defaults": {
            "system": DEMO_SYSTEM, "max_seq_length": 128,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "train": {"epochs": 1, "lr": 2.0e-3, "batch_size": 8, "warmup_ratio": 0.1, "scheduler": "linear",
                      "seed": seed, "logging_steps": 5, "save_steps": 20},
        },
        "datasets": datasets,
    }


def run_demo(out_dir: Path = Path("runs/demo"), seed: int = 0, progress: bool = True) -> dict:
    """Generate data, train every adapter, evaluate; returns (and saves) the results table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_demo_data(out_dir / "data", seed=seed, **DEMO_SIZES)
    recipe_path = out_dir / "demo.yaml"
    atomic_write_text(recipe_path, "# written by `loraplex demo`\n" +
                      yaml.safe_dump(demo_recipe(seed), sort_keys=False, allow_unicode=True))
    recipe = load_recipe(recipe_path)
    result = train(recipe, overwrite=True, progress=progress)
    adapters = {name: result.run_dir / "adapters" / name for name in result.adapters}
    adapter_set = load(recipe.model.path, adapters)
    rows = []
    for spec in recipe.datasets:
        data_name = DEMO_ADAPTERS[spec.name][0]
        test_rows = [r.value for r in iter_raw_rows(recipe.resolve(spec.files("test_path")[0]))]
        meta = result.adapters[spec.name]
        rows.append({
            "dataset": spec.name, "target_modules": spec.target_modules,
            "heldout_loss_base": meta["heldout_loss_base"], "heldout_loss_adapter": meta["heldout_loss"],
            "exact_match_base": split_exact_match(adapter_set, None, spec, data_name, test_rows),
            "exact_match_adapter": split_exact_match(adapter_set, spec.name, spec, data_name, test_rows),
            "trainable_params": meta["trainable_params"], "wall_time_s": meta["wall_time_s"],
        })
    summary = {"seed": seed, "run_dir": str(result.run_dir), "results": rows}
    atomic_write_json(result.run_dir / "demo_results.json", summary)
    return summary


def split_exact_match(adapter_set: AdapterSet, adapter: str | None, spec, data_name: str, rows: list[dict],
                     max_new_tokens: int = 24) -> float:
    """Share of test rows whose greedy answer passes the demo task's checker."""
    tokenizer = adapter_set.tokenizer
    template = chat_template_for(tokenizer, spec.template)
    prompts = [prompt_text(tokenizer, to_messages(r, "alpaca", {}, spec.system), template) for r in rows]
    adapter_set.use(adapter)
    with adapter_set.active_model() as model:
        predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=25)
    return sum(check_answer(data_name, r, p) for r, p in zip(rows, predictions)) / len(rows)


def targets_met(row: dict) -> dict[str, bool]:
    """The demo's promises per dataset: loss at least 30% below base, exact match +20 points."""
    base, adapted = row["heldout_loss_base"], row["heldout_loss_adapter"]
    loss_ok = not math.isnan(adapted) and adapted <= 0.7 * base
    return {"loss_-30%": loss_ok, "exact_match_+20pt": row["exact_match_adapter"] - row["exact_match_base"] >= 0.2}
