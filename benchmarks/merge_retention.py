"""How much of each adapter's held-out gain does one model for all datasets keep? Merge methods and baselines,
measured on the same held-out rows, which no search saw.

    python benchmarks/merge_retention.py [--work /tmp/loraplex-merge-retention] [--out results.json]

On the demo data (zh on q_proj, en and ja on v_proj, as `loraplex demo` trains them), for zh+en and zh+en+ja:
- sum: the exact sum of the adapters at weight 1 (what `loraplex merge` does by default);
- weights-search: the exact sum at one weight per adapter, searched on the even rows of each held-out split;
- compose: zh trained on top of en (and ja), loaded, active and frozen (`compose_with`), then merged with them;
- union: one adapter trained on the union of the datasets' training rows (same total steps, the union of their
  modules, the same rank): a model for all datasets without merging;
- routing: each prompt answered by the adapter the router picks (`model: auto` of `loraplex serve`).
Retention = (base loss − loss) / (base loss − the dataset's own adapter's loss), on the odd rows of each
held-out split. Prints one table per group and the worst retention per method.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from common import BENCHMARK_DEMO_SIZES, add_output_options, work_folder

GROUPS = (("zh", "en"), ("zh", "en", "ja"))
# compose: (adapter, its data, the adapters it trains on top of); per group the adapters merged for "compose"
COMPOSED = (("zh_c", "zh", ("en",)), ("ja_c", "ja", ("en",)), ("zh_cc", "zh", ("en", "ja_c")))
COMPOSE_MERGE = {("zh", "en"): ("en", "zh_c"), ("zh", "en", "ja"): ("en", "ja_c", "zh_cc")}


def recipe(work: Path, model: str = "default", max_steps: int | None = None, sizes: dict | None = None) -> Path:
    from loraplex.demo.data import DEMO_ADAPTERS, demo_file, write_demo_data
    from loraplex.demo.command import demo_recipe

    write_demo_data(work / "data", seed=0, **(sizes or BENCHMARK_DEMO_SIZES))
    raw = demo_recipe(0, "merge-retention")
    raw["output_dir"] = str(work / "runs")
    raw["model"]["path"] = model
    if max_steps:
        raw["defaults"]["train"]["max_steps"] = max_steps
    raw["datasets"] = [d for d in raw["datasets"] if d["name"] in ("zh", "en", "ja")]
    for d in raw["datasets"]:
        for key in ("path", "val_path", "test_path"):
            d[key] = str(work / d[key])
    for group in GROUPS:  # the union baseline: exactly the union of the training rows (held-out rows kept out)
        modules = sorted({m for name in group for m in DEMO_ADAPTERS[name][1]})
        raw["datasets"].append({"name": "union_" + "_".join(group), "target_modules": modules,
                                "path": [str(work / demo_file(n, "train")) for n in group],
                                "val_path": [str(work / demo_file(n, "val")) for n in group]})
    plain = {d["name"]: d for d in raw["datasets"] if d["name"] in ("zh", "en", "ja")}
    for name, data, others in COMPOSED:  # trained on top of the others (loaded, active, frozen)
        raw["datasets"].append({**plain[data], "name": name, "compose_with": list(others)})
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    return path


@torch.no_grad()
def routed_loss(reference, router, rows) -> float:
    """Token-weighted answer loss of `rows`, each answered by the adapter the router picks for its prompt."""
    from loraplex.routing import BASE, prompt_ids
    from loraplex.lm.packed import PackedCollator, answer_loss_sum

    total = count = 0
    device = next(reference.parameters()).device
    for row in rows:
        picked, _ = router.route_ids(prompt_ids(row["input_ids"], row["labels"]))
        batch = {k: v.to(device) for k, v in PackedCollator()([row]).items()}
        if picked == BASE:
            with reference.disable_adapter():
                loss, n, _ = answer_loss_sum(reference, batch)
        else:
            reference.base_model.set_adapter(picked, inference_mode=True)
            loss, n, _ = answer_loss_sum(reference, batch)
        total, count = total + float(loss), count + n
    return total / max(count, 1)


def measure(run_dir: Path, group: tuple[str, ...], work: Path) -> dict:
    from loraplex.merging import merge
    from loraplex.merging.apply import reference_model
    from loraplex.merging.plan import plan_merge
    from loraplex.merging.search import halves
    from loraplex.merging.verify import all_adapters_active
    from loraplex.routing import Router, mean_hidden_states
    from loraplex.run import adapter_metadata, adapter_dir, open_run
    from loraplex.lm.packed import heldout_metrics

    started = time.perf_counter()
    report = merge(run_dir, list(group), method="weights-search", out_dir=work / "merged" / "+".join(group),
                   overwrite=True)
    search_seconds = time.perf_counter() - started
    rows = report.heldout["datasets"]  # on the report rows: base, own adapter, merged at the searched weights
    union = "union_" + "_".join(group)
    plan = plan_merge(run_dir, [*group, union], None, "sum", "float32")
    _, report_rows = halves(plan)
    reference = reference_model(plan)
    losses: dict[str, dict[str, float]] = {"sum": {}, "weights-search": {}, "compose": {}, "union": {}, "routing": {}}
    composed = plan_merge(run_dir, list(COMPOSE_MERGE[group]), None, "sum", "float32")
    composed_reference = reference_model(composed)
    with all_adapters_active(composed_reference, composed):
        for name in group:
            losses["compose"][name] = heldout_metrics(composed_reference, report_rows[name])["loss"]
    del composed_reference
    sum_plan = plan_merge(run_dir, list(group), None, "sum", "float32")
    with all_adapters_active(reference, sum_plan):
        for name in group:
            losses["sum"][name] = heldout_metrics(reference, report_rows[name])["loss"]
    reference.base_model.set_adapter(union, inference_mode=True)
    for name in group:
        losses["union"][name] = heldout_metrics(reference, report_rows[name])["loss"]
        losses["weights-search"][name] = rows[name]["merged"]
    prepared = open_run(run_dir, only=list(group)).prepare()
    metas = {n: adapter_metadata(adapter_dir(run_dir, n)) for n in group}

    def embed(prompts):
        with reference.disable_adapter():
            return mean_hidden_states(reference, prompts)

    router = Router.build(embed, prepared, {n: tuple(metas[n]["dataset_files"]) for n in group},
                          {n: metas[n]["heldout_loss"] for n in group})
    for name in group:
        losses["routing"][name] = routed_loss(reference, router, report_rows[name])
    retention = {method: {n: (rows[n]["base"] - value[n]) / (rows[n]["base"] - rows[n]["adapter"]) for n in group}
                 for method, value in losses.items()}
    union_meta = adapter_metadata(adapter_dir(run_dir, union))
    return {"group": list(group), "base": {n: rows[n]["base"] for n in group},
            "adapter": {n: rows[n]["adapter"] for n in group}, "losses": losses, "retention": retention,
            "weights": report.weights_search["weights"], "search": report.weights_search,
            "report_rows": {n: rows[n]["rows"] for n in group}, "search_seconds": search_seconds,
            "union_training_s": union_meta["wall_time_s"], "compose_merged": list(COMPOSE_MERGE[group]),
            "compose_training_s": sum(adapter_metadata(adapter_dir(run_dir, n))["wall_time_s"]
                                      for n in COMPOSE_MERGE[group]),
            "adapters_training_s": sum(metas[n]["wall_time_s"] for n in group)}


def show(result: dict) -> None:
    group = result["group"]
    rows = ", ".join(f"{n} {r} rows" for n, r in result["report_rows"].items())
    print(f"\n{'+'.join(group)}: retention of each adapter's held-out gain ({rows}, "
          f"unseen by the search); weights found {', '.join(f'{n} {w:g}' for n, w in result['weights'].items())}")
    print(f"  {'method':15}" + "".join(f"{n:>16}" for n in group) + f"{'worst':>9}  extra cost")
    print(f"  {'base / own':15}" + "".join(f"{result['base'][n]:>7.3f} /{result['adapter'][n]:>7.3f}" for n in group))
    costs = {"sum": "0", "weights-search": f"{result['search_seconds']:.0f}s search+merge",
             "union": f"{result['union_training_s']:.0f}s training "
                      f"(the adapters: {result['adapters_training_s']:.0f}s)",
             "compose": f"{result['compose_training_s']:.0f}s training ({'+'.join(result['compose_merged'])})",
             "routing": "a router at serving time"}
    for method, kept in result["retention"].items():
        loss = result["losses"][method]
        print(f"  {method:15}" + "".join(f"{loss[n]:>7.3f} {kept[n]:>7.0%}" for n in group)
              + f"{min(kept.values()):>9.0%}  {costs[method]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_options(parser, "/tmp/loraplex-merge-retention")
    parser.add_argument("--model", default="default", help="base model (default: the embedded SmolLM2)")
    parser.add_argument("--max-steps", type=int, default=None, help="a quick check: this many steps per adapter")
    parser.add_argument("--rows", type=int, default=None, help="a quick check: this many training rows per language")
    args = parser.parse_args()
    from loraplex.training.runner import train

    work = work_folder(args)
    sizes = {"n_train": args.rows, "n_val": 8, "n_test": 4} if args.rows else None
    run = train(recipe(work, args.model, args.max_steps, sizes), overwrite=True, progress=False)
    results = [measure(run.run_dir, group, work) for group in GROUPS]
    for result in results:
        show(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
