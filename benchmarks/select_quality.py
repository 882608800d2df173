"""Does `target_modules: auto` choose well? Its adapter against every fixed choice (q_proj, v_proj, q_proj+v_proj,
o_proj, mlp, all-linear), each trained in full at the same parameter budget (rank matched), over several seeds.

    python benchmarks/select_quality.py [--datasets demo-zh demo-en demo-ja alpaca-zh alpaca-en o0-en] [--seeds 3]
                                        [--out benchmarks/results/select_quality.json]

`auto` decides on its selection rows (`auto.selection_rows`, carved from the training split); every adapter,
auto's included, is graded on the held-out split, which no decision read. For every dataset and seed one run
trains `auto` and the fixed choices (same seed, data order and budget). Per dataset it prints each adapter's
held-out loss per seed and its mean, auto's regret against the best fixed choice (the lowest mean) at each seed
and on average, and the seed spread (max - min over seeds) of that best choice.

`o0-en` is a dataset built so that the best set is not v_proj: the demo's English data on SmolLM2 with every
o_proj weight set to 0. The attention blocks then add nothing to the residual stream, so no change of q_proj,
k_proj or v_proj reaches the output: only o_proj and the MLP modules can learn the task.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from common import add_output_options, add_seed_options, cpu_line, demo_entry, seeds, work_folder

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
FIXED = {"q": ["q_proj"], "v": ["v_proj"], "qv": ["q_proj", "v_proj"], "o": ["o_proj"],
         "mlp": ["gate_proj", "up_proj", "down_proj"], "all": "all-linear"}
AUTO_ADAPTER = "auto-choice"  # `auto` names the router in `loraplex serve`: no adapter may take it
ZEROED = "o_proj"  # the modules set to 0 in the o0-* datasets' base


def dataset_entries(which: str, work: Path) -> tuple[dict, dict, str]:
    """(recipe defaults, dataset entry without name/targets, base model path) for one benchmark dataset."""
    if which.startswith(("demo-", "o0-")):
        defaults, entry = demo_entry(work, which.split("-", 1)[1])
        return defaults, entry, zeroed_base(work) if which.startswith("o0-") else "default"
    lang = which.split("-", 1)[1]
    defaults = {"max_samples": 240, "max_seq_length": 384, "val_size": 0.1, "lora": {"r": 16, "alpha": 32},
                "train": {"epochs": 1, "lr": 3.0e-4, "batch_size": 4, "logging_steps": 2, "seed": 0}}
    return defaults, {"path": str(SHARED / f"alpaca_{lang}_demo.json")}, "default"


def zeroed_base(work: Path) -> str:
    """SmolLM2 with every ZEROED weight set to 0, saved once under `work`."""
    import torch
    from loraplex.models import load_model, load_tokenizer, resolve_base

    folder = work / f"base-{ZEROED}-zeroed"
    if not (folder / "config.json").is_file():
        ref = resolve_base("default")
        model = load_model(ref, torch.float32)
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.rsplit(".", 1)[-1] == ZEROED:
                    module.weight.zero_()
        model.save_pretrained(folder)
        load_tokenizer(ref).save_pretrained(folder)
    return str(folder)


def matched(model_meta, budget: int, targets) -> dict | str:
    """The rank and alpha that give `targets` the budget, or why no rank does."""
    from loraplex.targets import candidates

    candidate = candidates(model_meta, [targets] if isinstance(targets, str) else [targets])[0]
    miss = candidate.budget_miss(budget)
    if miss:
        return miss
    rank = candidate.rank_for(budget)
    return {"r": rank, "alpha": 2.0 * rank}  # the recipes' alpha / r = 2


def run_one(which: str, seed: int, work: Path, fixed: list[str]) -> dict:
    """Train auto and the `fixed` choices at one seed; returns each adapter's held-out loss and auto's decision."""
    from loraplex.models import meta_model, resolve_base
    from loraplex.run import adapter_dir, adapter_metadata
    from loraplex.targets import default_budget
    from loraplex.training.runner import train

    defaults, entry, base = dataset_entries(which, work)
    defaults = json.loads(json.dumps(defaults))
    defaults["train"]["seed"] = seed
    meta = meta_model(resolve_base(base))
    budget = default_budget(meta, defaults["lora"]["r"])
    datasets, left_out = [{**entry, "name": AUTO_ADAPTER, "target_modules": "auto"}], {}
    for name in fixed:
        targets = FIXED[name]
        lora = matched(meta, budget, targets)
        if isinstance(lora, str):
            left_out[name] = lora
            continue
        datasets.append({**entry, "name": name, "target_modules": targets, "lora": lora})
    run_name = f"{which}-seed{seed}" + ("" if fixed == list(FIXED) else "-" + "_".join(fixed))
    recipe = {"model": {"path": base}, "run_name": run_name, "output_dir": str(work / "runs"), "defaults": defaults,
              "datasets": datasets}
    path = work / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False))
    # the fixed choices an earlier run of this recipe (same work folder) finished stay: they do not depend on the
    # selection method; auto is trained again every time
    names = [AUTO_ADAPTER] + [d["name"] for d in datasets[1:] if not finished(work / "runs" / run_name, d["name"])]
    train(path, only=names, overwrite=True, resume=True, progress=False)
    out = {"seed": seed, "budget": budget, "adapters": {}, "left_out": left_out}
    for d in datasets:
        m = adapter_metadata(adapter_dir(work / "runs" / run_name, d["name"]))
        key = "auto" if d["name"] == AUTO_ADAPTER else d["name"]
        out["adapters"][key] = {"target_modules": m["config"]["target_modules"], "r": m["config"]["lora"]["r"],
                                      "params": m["trainable_params"], "heldout_loss": m["heldout_loss"],
                                      "heldout_loss_base": m["heldout_loss_base"], "wall_time_s": m["wall_time_s"]}
        if "selection" in m:
            s = m["selection"]
            out["adapters"][key]["selection"] = {k: s.get(k) for k in (
                "winner", "decided_by", "seconds", "full_training_s", "candidates", "trials", "rows", "dropped")}
    return out


def finished(run_dir: Path, name: str) -> bool:
    from loraplex.run import adapter_dir, adapter_metadata

    return "heldout_loss" in adapter_metadata(adapter_dir(run_dir, name))


def summary(runs: list[dict]) -> dict:
    """Per adapter the mean held-out loss; the best fixed choice; auto's regret against it; its seed spread."""
    names = [n for n in runs[0]["adapters"]]
    mean = {n: statistics.mean(r["adapters"][n]["heldout_loss"] for r in runs) for n in names}
    best = min((n for n in names if n != "auto"), key=mean.get)
    regrets = [r["adapters"]["auto"]["heldout_loss"] - r["adapters"][best]["heldout_loss"] for r in runs]
    best_losses = [r["adapters"][best]["heldout_loss"] for r in runs]
    return {"mean": mean, "best_fixed": best, "regret_per_seed": regrets, "mean_regret": statistics.mean(regrets),
            "best_fixed_spread": max(best_losses) - min(best_losses),
            "auto_chose": [r["adapters"]["auto"]["selection"]["winner"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+",
                        default=["demo-zh", "demo-en", "demo-ja", "alpaca-zh", "alpaca-en", "o0-en"])
    add_seed_options(parser)
    parser.add_argument("--fixed", nargs="+", choices=list(FIXED), default=list(FIXED),
                        help="the fixed choices to train beside auto (default: all)")
    add_output_options(parser, "/tmp/loraplex-select-quality")
    args = parser.parse_args()
    work = work_folder(args)
    results: dict = {"cpu": cpu_line(), "seeds": args.seeds, "datasets": {}}
    for which in args.datasets:
        started = time.perf_counter()
        runs = []
        for seed in seeds(args):  # saved after every seed: an interrupted
            runs.append(run_one(which, seed, work, args.fixed))  # benchmark keeps what it measured
            results["datasets"][which] = {"runs": runs, "summary": summary(runs)}
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False))
        print_dataset(which, runs, results["datasets"][which]["summary"], time.perf_counter() - started)


def print_dataset(which: str, runs: list[dict], s: dict, seconds: float) -> None:
    sel = runs[0]["adapters"]["auto"]["selection"]
    print(f"\n{which}: budget {runs[0]['budget']:,} params; auto chose {', '.join(s['auto_chose'])} "
          f"(seed {runs[0]['seed']} "
          f"decided by {sel['decided_by']}; {(sel.get('rows') or {}).get('note', '')})")
    for name, why in runs[0]["left_out"].items():
        print(f"  {name}: left out, {why}")
    print(f"  {'adapter':8} {'modules':28} {'r':>4} {'params':>9}  held-out loss per seed      mean")
    for name, a in runs[0]["adapters"].items():
        per_seed = " ".join(f"{r['adapters'][name]['heldout_loss']:.4f}" for r in runs)
        modules = a["target_modules"] if isinstance(a["target_modules"], str) else "+".join(a["target_modules"])
        print(f"  {name:8} {modules:28} {a['r']:>4} {a['params']:>9,}  {per_seed:26} {s['mean'][name]:.4f}")
    print(f"  best fixed: {s['best_fixed']}; auto's regret per seed "
          f"{' '.join(f'{x:+.4f}' for x in s['regret_per_seed'])}, mean {s['mean_regret']:+.4f}; seed spread of "
          f"{s['best_fixed']} {s['best_fixed_spread']:.4f}   [{seconds:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
