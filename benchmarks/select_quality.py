"""Does `target_modules: auto` choose well? Its adapter against q_proj, v_proj, q_proj+v_proj and all-linear,
each trained in full at the same parameter budget (rank matched), on the demo data and the shared alpaca data.

    python benchmarks/select_quality.py [--datasets demo-zh demo-en demo-ja alpaca-zh alpaca-en] [--seeds 3]
                                        [--out benchmarks/results/select_quality.json]

For every dataset one run trains `auto` and the four references (same seed, data order and budget). The
references on --seed-datasets are also trained with --seeds seeds: the spread of their held-out losses is the
noise a choice has to be judged against. --reuse keeps the references of an earlier run in --work (only `auto`
trains again). Prints, per dataset, each adapter's held-out loss, the winner and the selection's time against
its full training's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
REFERENCES = {"q": ["q_proj"], "v": ["v_proj"], "qv": ["q_proj", "v_proj"], "all": "all-linear"}


def dataset_entries(which: str, work: Path) -> tuple[dict, dict]:
    """(recipe defaults, dataset entry without name/targets) for one benchmark dataset."""
    if which.startswith("demo-"):
        from loraplex.data.demo import demo_file, write_demo_data
        from loraplex.demo import DEMO_SIZES, DEMO_SYSTEM, demo_recipe

        lang = which.split("-", 1)[1]
        if not (work / "data").is_dir():
            write_demo_data(work / "data", seed=0, **DEMO_SIZES)
        defaults = demo_recipe(0)["defaults"]
        return defaults, {"path": str(work / demo_file(lang, "train")), "val_path": str(work / demo_file(lang, "val")),
                          "system": DEMO_SYSTEM}
    lang = which.split("-", 1)[1]
    defaults = {"max_samples": 240, "max_seq_length": 384, "val_size": 0.1, "lora": {"r": 16, "alpha": 32},
                "train": {"epochs": 1, "lr": 3.0e-4, "batch_size": 4, "logging_steps": 2, "seed": 0}}
    return defaults, {"path": str(SHARED / f"alpaca_{lang}_demo.json")}


def matched(model_meta, budget: int, targets) -> dict:
    from loraplex.targets import candidates

    candidate = candidates(model_meta, [targets] if isinstance(targets, str) else [targets])[0]
    rank = candidate.rank_for(budget)
    return {"r": rank, "alpha": 2.0 * rank}  # the recipes' alpha / r = 2


def run_one(which: str, seed: int, with_auto: bool, work: Path, reuse: bool = False) -> dict:
    from loraplex.models import meta_model, resolve_base
    from loraplex.targets import default_budget
    from loraplex.training.runner import train

    defaults, entry = dataset_entries(which, work)
    defaults = json.loads(json.dumps(defaults))
    defaults["train"]["seed"] = seed
    meta = meta_model(resolve_base("default"))
    budget = default_budget(meta, defaults["lora"]["r"])
    datasets = [{**entry, "name": "auto", "target_modules": "auto"}] if with_auto else []
    for name, targets in REFERENCES.items():
        datasets.append({**entry, "name": name, "target_modules": targets, "lora": matched(meta, budget, targets)})
    from loraplex.run import adapter_dir, adapter_metadata, complete_adapters

    refs_dir = work / "runs" / f"{which}-seed{seed}"
    kept = reuse and refs_dir.is_dir() and set(REFERENCES) <= set(complete_adapters(refs_dir))
    if kept:  # --reuse: the references of the earlier run stay where they are; auto trains in a run of its own
        datasets = datasets[:1] if with_auto else []
    folders = {name: refs_dir for name in REFERENCES}
    if datasets:
        run_name = f"{which}-seed{seed}" + ("-auto" if kept else "")
        recipe = {"model": "default", "run_name": run_name, "output_dir": str(work / "runs"), "defaults": defaults,
                  "datasets": datasets}
        path = work / f"{run_name}.yaml"
        path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False))
        train(path, overwrite=True, progress=False)
        folders.update({d["name"]: work / "runs" / run_name for d in datasets})
    out = {"budget": budget, "adapters": {}, "references_reused": bool(kept)}
    for name, folder in sorted(folders.items(), key=lambda item: item[0] != "auto"):
        m = adapter_metadata(adapter_dir(folder, name))
        cfg = m["config"]
        out["adapters"][name] = {"target_modules": cfg["target_modules"], "r": cfg["lora"]["r"],
                                 "params": m["trainable_params"], "heldout_loss": m["heldout_loss"],
                                 "heldout_loss_base": m["heldout_loss_base"], "wall_time_s": m["wall_time_s"]}
        if "selection" in m:
            s = m["selection"]
            out["adapters"][name]["selection"] = {k: s[k] for k in ("winner", "decided_by", "seconds", "cached",
                                                                     "full_training_s", "candidates", "trials")}
    return out


def cpu_line() -> str:
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((l.split(":", 1)[1].strip() for l in flags.splitlines() if l.startswith("model name")), platform.machine())
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return f"CPU {name}, {os.cpu_count()} cores, native bf16: {'yes' if bf16 else 'no (AVX2 or older)'}; torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["demo-zh", "demo-en", "demo-ja", "alpaca-zh", "alpaca-en"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the references on --seed-datasets")
    parser.add_argument("--seed-datasets", nargs="+", default=None, help="default: the first of --datasets")
    parser.add_argument("--work", default="/tmp/loraplex-select-quality")
    parser.add_argument("--out", default=None)
    parser.add_argument("--reuse", action="store_true", help="keep the references an earlier run of the same recipe "
                        "trained (in --work); train only the auto adapter")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(cpu_line(), flush=True)
    results: dict = {"cpu": cpu_line(), "datasets": {}}
    for which in args.datasets:
        started = time.perf_counter()
        runs = [run_one(which, 0, True, work, args.reuse)]
        for seed in range(1, args.seeds if which in (args.seed_datasets or args.datasets[:1]) else 1):
            runs.append(run_one(which, seed, False, work, args.reuse))
        results["datasets"][which] = runs
        print_dataset(which, runs, time.perf_counter() - started)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False))


def print_dataset(which: str, runs: list[dict], seconds: float) -> None:
    first = runs[0]["adapters"]
    auto = first["auto"]
    sel = auto["selection"]
    print(f"\n{which}: budget {runs[0]['budget']:,} params; winner {sel['winner']} (decided by {sel['decided_by']}, "
          f"r={auto['r']}); selection {sel['seconds']:.1f}s vs full training {sel['full_training_s']:.1f}s "
          f"({100 * sel['seconds'] / sel['full_training_s']:.0f}%){' [cached]' if sel['cached'] else ''}")
    print(f"  {'adapter':8} {'modules':28} {'r':>4} {'params':>9} {'held-out (seed 0)':>18}  seeds")
    for name, a in first.items():
        seeds = [r["adapters"][name]["heldout_loss"] for r in runs if name in r["adapters"]]
        spread = f"{min(seeds):.4f}..{max(seeds):.4f} (n={len(seeds)})" if len(seeds) > 1 else ""
        modules = a["target_modules"] if isinstance(a["target_modules"], str) else "+".join(a["target_modules"])
        print(f"  {name:8} {modules:28} {a['r']:>4} {a['params']:>9,} {a['heldout_loss']:>18.4f}  {spread}")
    best = min((a["heldout_loss"], n) for n, a in first.items() if n != "auto")
    print(f"  auto - best reference ({best[1]}): {auto['heldout_loss'] - best[0]:+.4f}   [{seconds:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
