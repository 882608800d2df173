"""LoRA variants side by side: held-out loss of LoRA, PiSSA, OLoRA, EVA and LoRA+ on the demo's Chinese data.

    nice -n 5 python benchmarks/variants.py [--seeds 3] [--max-steps 20] [--out benchmarks/results/variants.json]

Every variant trains the demo's zh adapter (SmolLM2-135M, q_proj, r 16, alpha 32, the demo's lr, batch and
schedule) for the same number of optimizer steps on the same rows in the same order (one seed per run: every
variant of a run shares it), so they differ only in how A and B start (LoRA's default, PiSSA, OLoRA, EVA) or in
B's learning rate (LoRA+, ratio 16). Parameter counts are equal, except EVA's, which may move rank between
layers within the same total. Each adapter is graded on the held-out split (val), which no variant read: EVA
reads training rows only. The loss is the trained model's (for PiSSA and OLoRA: on the rewritten base); the
`reload Δ` column is the largest logit difference of the saved adapter on the untouched base against it. It
prints each variant's held-out loss per seed, the mean, and the mean difference to LoRA; no variant has a
target to meet.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from common import add_output_options, add_seed_options, cpu_line, demo_entry, seeds, work_folder

VARIANTS = {"lora": {}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"}, "eva": {"init": "eva"},
            "loraplus": {"loraplus_lr_ratio": 16}}


def run_seed(seed: int, max_steps: int, work: Path) -> dict:
    """Train every variant at one seed; returns name -> held-out loss, params, init seconds, wall time."""
    from loraplex.demo.data import DEMO_ADAPTERS
    from loraplex.run import adapter_dir, adapter_metadata
    from loraplex.training.runner import train

    lang, targets = DEMO_ADAPTERS["zh"]
    defaults, entry = demo_entry(work, lang, seed)
    defaults["train"].update(max_steps=max_steps, save_steps=max_steps)
    entry["target_modules"] = targets
    datasets = [{**entry, "name": name, "lora": {**defaults["lora"], **lora}} for name, lora in VARIANTS.items()]
    run_name = f"variants-seed{seed}-steps{max_steps}"
    recipe = {"model": {"path": "default"}, "run_name": run_name, "output_dir": str(work / "runs"),
              "defaults": defaults, "datasets": datasets}
    path = work / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False))
    train(path, resume=True, progress=False)  # adapters an interrupted run of this recipe finished stay
    out = {}
    for name in VARIANTS:
        m = adapter_metadata(adapter_dir(work / "runs" / run_name, name))
        out[name] = {"heldout_loss": m["heldout_loss"], "heldout_loss_base": m["heldout_loss_base"],
                     "params": m["trainable_params"], "wall_time_s": m["wall_time_s"],
                     "variant": m.get("variant", {}), "reload_max_abs_diff": m["reload_max_abs_diff"]}
    return out


def print_table(runs: list[dict], seeds: list[int]) -> None:
    lora = statistics.mean(r["lora"]["heldout_loss"] for r in runs)
    print(f"\ndemo zh, held-out loss (base {runs[0]['lora']['heldout_loss_base']:.4f}); seeds {seeds}")
    print(f"  {'variant':9} {'params':>8}  {'per seed':{8 * len(runs)}} {'mean':>7} {'vs LoRA':>8}  init s  reload Δ")
    for name in VARIANTS:
        losses = [r[name]["heldout_loss"] for r in runs]
        mean = statistics.mean(losses)
        init = statistics.mean(r[name]["variant"].get("cost", {}).get("init_s", 0.0) for r in runs)
        print(f"  {name:9} {runs[0][name]['params']:>8,}  {' '.join(f'{x:.4f} ' for x in losses)}"
              f"{mean:7.4f} {mean - lora:+8.4f}  {init:6.2f}  {max(r[name]['reload_max_abs_diff'] for r in runs):.1e}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_seed_options(parser)
    parser.add_argument("--max-steps", type=int, default=20, help="optimizer steps per adapter (the demo's epoch: 40)")
    add_output_options(parser, "/tmp/loraplex-variants")
    args = parser.parse_args()
    work = work_folder(args)
    results: dict = {"cpu": cpu_line(), "max_steps": args.max_steps, "variants": VARIANTS, "runs": {}}
    started = time.perf_counter()
    for seed in seeds(args):  # saved after every seed: an interrupted
        results["runs"][seed] = run_seed(seed, args.max_steps, work)  # benchmark keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False))
        print_table(list(results["runs"].values()), list(results["runs"]))
    print(f"[{time.perf_counter() - started:.0f}s]")


if __name__ == "__main__":
    main()
