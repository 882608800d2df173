"""The `loraplex` command: a thin layer over the library; each command calls one library function.

Errors are printed as one friendly line (or a list) with the fix; the traceback appears only with
LORAPLEX_DEBUG=1.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape  # error lines hold 'datasets[zh]', which markup would eat

from .errors import LoraplexError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="One base model, one LoRA/QLoRA adapter per dataset, each on its own target modules.")
console = Console(stderr=True)
stdout = Console()

RECIPE_ARG = typer.Argument(..., help="recipe YAML file", exists=False)
OVERRIDES_ARG = typer.Argument(None, help="dotted overrides, e.g. datasets.zh.lora.r=32 defaults.train.lr=1e-4")


# the library's parameters -> the flags that set them
FLAGS = {"adapters": "--adapters", "weights": "--weights", "method": "--method", "dtype": "--dtype",
         "density": "--density", "out_dir": "--out", "out": "--out", "overwrite": "--overwrite", "force": "--force",
         "module": "--module", "layer": "--layer", "only": "--only", "merged": "--merged",
         "merged_type": "--merged-type", "verify": "--verify", "rows": "--rows", "allow_pickle": "--allow-pickle",
         "resume": "--resume", "prune": "--prune", "lora_target_modules": "--lora-target-modules"}
_PARAM_HEAD = re.compile(r"^(\s*- )?(" + "|".join(FLAGS) + r"): ", re.MULTILINE)
_PARAM_NAME = re.compile(r"`(" + "|".join(FLAGS) + r")`")
_PARAM_VALUE = re.compile(r"\b(" + "|".join(FLAGS) + r")=('[^']*'|\[[^\]]*\]|<[^>]*>|[\w.-]+)")


def cli_words(message: str) -> str:
    """A library message in the CLI's words: a line led by a parameter's name is led by its flag, and
    `overwrite=True`, `method='sum'`, `adapters=['zh', 'en']`, `weights=None`, `merged=<folder>` read as the flags
    that say so, and a parameter named in backquotes (`only`) as its flag."""
    def flag(match: re.Match) -> str:
        name, value = FLAGS[match.group(1)], match.group(2)
        if value == "True":
            return name
        if value in ("None", "False"):
            return f"{name} out"
        parts = [part.strip().strip("'") for part in value.strip("[]").split(",")]
        return f"{name} {','.join(parts)}"

    message = _PARAM_HEAD.sub(lambda m: f"{m.group(1) or ''}{FLAGS[m.group(2)]}: ", message)
    return _PARAM_NAME.sub(lambda m: FLAGS[m.group(1)], _PARAM_VALUE.sub(flag, message))


def _run(fn, *args, **kwargs):
    """Call a library function; map loraplex errors to a clean message in the CLI's words and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except LoraplexError as exc:
        if os.environ.get("LORAPLEX_DEBUG") == "1":
            raise
        console.print(f"[bold red]error:[/] {escape(cli_words(exc.render()))}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


@app.command()
def init(path: Path = typer.Argument(Path("recipe.yaml"), help="where to write the example recipe"),
         force: bool = typer.Option(False, "--force", help="overwrite an existing file")) -> None:
    """Write a commented example recipe."""
    if path.exists() and not force:
        console.print(f"[bold red]error:[/] {escape(str(path))} exists; pass --force to overwrite it")
        raise typer.Exit(2)
    text = resources.files("loraplex").joinpath("recipes/example.yaml").read_text(encoding="utf-8")
    path.write_text(text, encoding="utf-8")
    stdout.print(f"wrote {path}; edit the datasets, then run `loraplex prepare {path}`")


@app.command()
def prepare(recipe: Path = RECIPE_ARG, overrides: Optional[list[str]] = OVERRIDES_ARG,
            only: Optional[list[str]] = typer.Option(None, "--only", help="prepare only this dataset (repeatable)"),
            as_json: bool = typer.Option(False, "--json", help="print the statistics as JSON")) -> None:
    """Validate the recipe, tokenize every dataset (cached) and print length statistics."""
    from .pipeline import prepare_recipe
    from .display import prepare_table

    stats = [asdict(s) for s in _run(prepare_recipe, recipe, overrides or [], only)]
    if as_json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        stdout.print(prepare_table(stats))


@app.command()
def train(recipe: Path = RECIPE_ARG, overrides: Optional[list[str]] = OVERRIDES_ARG,
          only: Optional[list[str]] = typer.Option(None, "--only", help="train only this dataset (repeatable)"),
          resume: bool = typer.Option(False, "--resume", help="continue an interrupted adapter from its last "
                                      "checkpoint (when made with the same settings)"),
          overwrite: bool = typer.Option(False, "--overwrite", help="retrain the adapters (all, or --only ones) even "
                                         "if nothing changed"),
          prune: bool = typer.Option(False, "--prune", help="remove adapters of the run folder that the recipe no "
                                     "longer names (they are kept otherwise)"),
          allow_pickle: bool = typer.Option(False, "--allow-pickle", help="also read pickled .bin weights (they can "
                                            "run code: only files from a source you trust)"),
          nproc: int = typer.Option(1, "--nproc", min=1, help="train with N processes on this machine (data "
                                    "parallel; each step's batch_size is split over them; with "
                                    "distributed.strategy=fsdp the base is sharded over them too)"),
          ) -> None:
    """Train one LoRA adapter per dataset, each against the untouched base model."""
    from .display import select_table, train_table
    from .training.distributed import is_main, launch, launched
    from .training.runner import train as train_run

    if nproc > 1 and not launched():
        args = [str(recipe), *(overrides or []), *(f"--only={name}" for name in only or []),
                *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else []),
                *(["--prune"] if prune else []), *(["--allow-pickle"] if allow_pickle else [])]
        raise typer.Exit(_run(launch, nproc, ["train", *args]))
    result = _run(train_run, recipe, overrides or [], only, resume=resume, overwrite=overwrite,
                  allow_pickle=allow_pickle, prune=prune, say=lambda line: console.print(line, markup=False))
    if is_main():
        trained = {step.name for step in result.steps if step.trains}
        for name, meta in result.adapters.items():
            if "selection" in meta and name in trained:
                stdout.print(select_table(name, meta["selection"]))
        steps = [replace(step, action=cli_words(step.action), reason=cli_words(step.reason)) for step in result.steps]
        stdout.print(train_table(result.adapters, steps))
        for step in steps:
            if step.reason or step.name not in result.adapters:
                stdout.print(f"{step.name}: {step.describe()}", markup=False, highlight=False)
        for line in result.stale:
            console.print(f"[yellow]stale:[/] {escape(line)} (evaluate or merge again to refresh it)", highlight=False)
        stdout.print(f"adapters in {result.run_dir / 'adapters'}")


@app.command()
def select(recipe: Path = RECIPE_ARG, overrides: Optional[list[str]] = OVERRIDES_ARG,
           only: Optional[list[str]] = typer.Option(None, "--only", help="measure only this dataset (repeatable)"),
           allow_pickle: bool = typer.Option(False, "--allow-pickle", help="also read pickled .bin weights (they can "
                                             "run code: only files from a source you trust)"),
           as_json: bool = typer.Option(False, "--json", help="print the decisions as JSON")) -> None:
    """Which modules should each dataset train? Measure it (target_modules: auto) without the full training."""
    from .display import select_table
    from .selection.operation import select as select_run

    decisions = _run(select_run, recipe, overrides or [], only, allow_pickle=allow_pickle)
    if as_json:
        print(json.dumps({name: d.as_dict() for name, d in decisions.items()}, indent=2, ensure_ascii=False))
        return
    for name, decision in decisions.items():
        stdout.print(select_table(name, decision.as_dict()))


@app.command()
def demo(overrides: Optional[list[str]] = OVERRIDES_ARG,
         out: Path = typer.Option(Path("runs/demo"), "--out", help="run folder"),
         seed: int = typer.Option(0, "--seed", help="seed for the generated data and training")) -> None:
    """The whole job on generated en/zh/ja data: train an adapter per dataset, merge zh+en, evaluate, report."""
    import time

    from .demo.command import run_demo
    from .demo.table import demo_table, timing_table

    started = time.perf_counter()
    summary = _run(run_demo, out, seed, overrides or [],
                   log=lambda line: console.print(cli_words(line), markup=False, highlight=False))
    stdout.print(demo_table(summary))
    verification = summary["merged"]["verification"]
    merged = summary["merged"]
    weights = ", ".join(f"{name} {w:g}" for name, w in merged["weights"].items())
    stdout.print(f"merged zh+en ({merged['method']}: weights {weights}): {merged['dir']} (max |W' - formula| "
                 f"{verification['weights']['max_abs_diff']:.2e}, max logit diff vs base+adapters "
                 f"{verification['logits']['max_abs_diff']:.2e})", markup=False)
    heldout = (verification.get("heldout") or {}).get("datasets", {})
    if heldout:
        kept = ", ".join(f"{name} {row['kept']:.0%}" if row["kept"] is not None else f"{name} n/a"
                         for name, row in heldout.items())
        flagged = [name for name, row in heldout.items() if row["below_threshold"]]
        threshold = verification["heldout"]["threshold"]
        stdout.print(f"merged zh+en keeps of each adapter's held-out loss improvement (on the held-out rows the "
                     f"weight search did not see): {kept}"
                     + (f" (below {threshold:.0%}: {', '.join(flagged)}; disjoint modules still interact through the "
                        "residual stream)" if flagged else ""), markup=False)
    stdout.print(timing_table(summary))
    stdout.print(f"report: {summary['report']}", markup=False)
    stdout.print(f"run folder: {summary['run_dir']}  ({time.perf_counter() - started:.0f}s)", markup=False)


@app.command("demo-data")
def demo_data(out_dir: Path = typer.Argument(..., help="folder to write <dataset>/{train,val,test}.jsonl into"),
              seed: int = typer.Option(0, "--seed"),
              force: bool = typer.Option(False, "--force", help="replace demo files already in OUT_DIR")) -> None:
    """Write the demo datasets as JSONL, to see the format (nothing is trained)."""
    from .demo.data import DEMO_DATASETS, write_demo_data

    existing = [p for name in DEMO_DATASETS for p in sorted((out_dir / name).glob("*.jsonl"))]
    if existing and not force:
        console.print(f"[bold red]error:[/] {escape(str(out_dir))} already holds {len(existing)} demo file(s) "
                      f"({escape(str(existing[0]))}, ...); pass --force to replace them")
        raise typer.Exit(2)
    paths = write_demo_data(out_dir, seed=seed)
    for name, splits in paths.items():
        stdout.print(f"{name}: " + ", ".join(f"{split} {path}" for split, path in splits.items()))


@app.command("eval")
def eval_command(run: Path = typer.Argument(..., help="run folder, e.g. runs/demo"),
                 merged: Optional[list[Path]] = typer.Option(None, "--merged", help="a merged model folder to "
                                                             "evaluate as one more row (repeatable)"),
                 max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="greedy tokens per test answer"),
                 max_examples: Optional[int] = typer.Option(200, "--max-examples", help="first test rows per dataset "
                                                            "for exact match and chrF"),
                 no_generate: bool = typer.Option(False, "--no-generate", help="held-out metrics only")) -> None:
    """Evaluate the base, every adapter and merged models on every dataset's held-out and test data."""
    from .evaluation import GenerationSettings, evaluate_run
    from .display import eval_table
    from .run import stale_outputs

    settings = GenerationSettings(enabled=not no_generate, max_new_tokens=max_new_tokens, max_examples=max_examples)
    result = _run(evaluate_run, run, merged or [], settings, log=lambda message: console.print(f"[dim]{message}[/]"))
    stdout.print(eval_table(result.as_dict()))
    for line in stale_outputs(run):  # merged folders made with adapters that were retrained since
        console.print(f"[yellow]stale:[/] {escape(line)} (merge again to refresh it)", highlight=False)
    stdout.print(f"saved {run / 'eval.json'}")


@app.command()
def report(run: Path = typer.Argument(..., help="run folder, e.g. runs/demo")) -> None:
    """Write report.md and a self-contained report.html for a run (evaluates first if eval.json is missing)."""
    from .reporting import write_report

    written = _run(write_report, run)
    stdout.print(f"wrote {written.markdown} and {written.html}")


@app.command("inspect")
def inspect_command(adapter_dir: Path = typer.Argument(..., help="adapter folder, e.g. runs/<run>/adapters/zh"),
                    layer: Optional[int] = typer.Option(None, "--layer", help="only this layer index"),
                    module: Optional[str] = typer.Option(None, "--module", help="only this module, e.g. q_proj; with "
                                                         "--layer, also the values of W, A, B, ΔW and W + ΔW"),
                    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON")) -> None:
    """Show an adapter's config and scaling, and per layer × module the norms of A, B and ΔW = scaling·B@A."""
    from .display import render_inspect
    from .inspect_adapter import inspect_adapter

    report = _run(inspect_adapter, adapter_dir, layer=layer, module=module).to_dict()
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    for part in render_inspect(report):
        stdout.print(part)


@app.command("merge")
def merge_command(run: Path = typer.Argument(..., help="run folder, e.g. runs/<run>"),
                  adapters: str = typer.Option(..., "--adapters", help="adapters to merge, comma-separated: zh,en"),
                  out: Path = typer.Option(..., "--out", help="folder for the merged model"),
                  weights: Optional[str] = typer.Option(None, "--weights", help="one weight per adapter: 1,0.5 "
                                                        "(default 1 each)"),
                  method: str = typer.Option("auto", "--method", help="auto|sum|cat: exact weighted sum of the "
                                             "deltas; weights-search: the exact sum at one weight per adapter "
                                             "searched on half of each held-out split (keeps the most of the adapter "
                                             "that keeps least); linear|ties|dare_linear: PEFT's combinations (not "
                                             "exact)"),
                  dtype: str = typer.Option("float32", "--dtype", help="dtype of the saved weights: float32, "
                                            "bfloat16 or float16 (the merge itself runs in float32)"),
                  density: float = typer.Option(0.5, "--density", help="ties/dare_linear: share of values kept"),
                  overwrite: bool = typer.Option(False, "--overwrite",
                                                 help="replace a previous merge in --out")) -> None:
    """Merge adapters of a run into the base: a standalone model folder, verified against the formula."""
    from .display import render_merge
    from .merging import merge

    report = _run(merge, run, _names_flag(adapters), _weights_flag(weights), method, out_dir=out, dtype=dtype,
                  density=density,
                  overwrite=overwrite, echo=lambda line: stdout.print(line, markup=False, highlight=False))
    for part in render_merge(report.as_dict()):
        stdout.print(part)


def _names_flag(value: str) -> list[str]:
    """--adapters zh,en -> ["zh", "en"]."""
    return [name.strip() for name in value.split(",") if name.strip()]


def _weights_flag(value: str | None) -> list[float] | None:
    """--weights 1,0.5 -> [1.0, 0.5]; refused in the CLI's words when a part is not a number."""
    if value is None:
        return None
    try:
        return [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        console.print(f"[bold red]error:[/] --weights: {escape(repr(value))} is not a list of numbers, e.g. "
                      "--weights 1,0.5", highlight=False)
        raise typer.Exit(2) from None


@app.command("serve")
def serve_command(run: Path = typer.Argument(..., help="run folder, e.g. runs/demo"),
                  host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
                  port: int = typer.Option(8000, "--port", help="port to listen on"),
                  merged: Optional[list[Path]] = typer.Option(None, "--merged", help="a merged model folder to serve "
                                                              "too, as merged:<folder name> (repeatable)"),
                  api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LORAPLEX_API_KEY",
                                                        help="require 'Authorization: Bearer KEY'"),
                  max_batch_size: int = typer.Option(8, "--max-batch-size", min=1, help="requests decoded together "
                                                     "(1: one at a time)"),
                  max_tokens: int = typer.Option(1024, "--max-tokens-limit", min=1, help="the most tokens a request "
                                                 "may ask for")) -> None:
    """An OpenAI-compatible HTTP API over the run's base and every adapter; the request's `model` picks one."""
    from .serving import serve

    _run(serve, run, host, port, merged or [], api_key, max_batch_size=max_batch_size, max_tokens_limit=max_tokens,
         log=lambda line: console.print(line, markup=False, highlight=False))


export_app = typer.Typer(no_args_is_help=True, help="Commands for serving a run with other software.")
app.add_typer(export_app, name="export")


@export_app.command("vllm")
def export_vllm_command(run: Path = typer.Argument(..., help="run folder, e.g. runs/demo"),
                        out: Optional[Path] = typer.Option(None, "--out", help="write the command to this file "
                                                           "(a shell script) instead of printing it"),
                        lora_target_modules: Optional[str] = typer.Option(
                            None, "--lora-target-modules", help="restrict vLLM's LoRA layers to these modules, "
                            "comma-separated (warns about adapter modules left out)"),
                        force: bool = typer.Option(False, "--force",
                                                   help="replace the --out file if it exists")) -> None:
    """Print the `vllm serve` command that serves the run's base with every adapter (checked against vLLM's limits)."""
    from .exporting import ExportFormat, export as export_run

    targets = [t.strip() for t in lora_target_modules.split(",") if t.strip()] if lora_target_modules else None
    export = _run(export_run, run, ExportFormat.VLLM, out=out, lora_target_modules=targets, force=force)
    for warning in export.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if out is None:
        print(export.text(), end="")
    else:
        stdout.print(f"wrote {out}", markup=False, highlight=False)


@export_app.command("gguf")
def export_gguf_command(run: Path = typer.Argument(..., help="run folder, e.g. runs/demo"),
                        adapters: Optional[str] = typer.Option(None, "--adapters", help="adapters to export, "
                                                               "comma-separated (default: every finished one)"),
                        merged: Optional[Path] = typer.Option(None, "--merged", help="also write this merged model "
                                                              "folder (`loraplex merge --out`) as one GGUF file"),
                        merged_type: str = typer.Option("f16", "--merged-type", help="f16, bf16 or q8_0"),
                        out: Optional[Path] = typer.Option(None, "--out", help="folder to write into "
                                                           "(default: RUN/gguf)"),
                        verify: bool = typer.Option(False, "--verify", help="run each adapter in llama.cpp "
                                                    "(llama-cpp-python) and compare with loraplex on held-out rows"),
                        rows: int = typer.Option(16, "--rows", help="--verify: held-out rows per adapter"),
                        force: bool = typer.Option(False, "--force", help="replace files written before")) -> None:
    """Each adapter as a llama.cpp LoRA file (GGUF) with an Ollama Modelfile; optionally a merged model as GGUF."""
    from .exporting import ExportFormat, export as export_run

    result = _run(export_run, run, ExportFormat.GGUF, adapters=_names_flag(adapters) if adapters else None,
                  merged=merged, merged_type=merged_type, out=out, force=force, verify=verify, rows=rows)
    say = print  # plain lines: paths must not wrap
    for name, path in result.loras.items():
        say(f"{name}: {path}  {result.modelfiles[name]}")
        if result.base_gguf:
            say(f"  llama-cli -m {result.base_gguf} --lora {path}")
    if result.merged:
        say(f"merged: {result.merged}")
    for name, check in result.checks.items():
        loss = check.loss
        say(f"{name} under llama.cpp vs loraplex ({check.rows} held-out rows, {check.answer_tokens} answer tokens): "
            f"greedy agreement {check.greedy_agreement:.0%}; mean |Δ log-prob| base {check.base_gap:.4f}, "
            f"base+adapter {check.adapter_gap:.4f}; held-out loss base -> adapter: llama.cpp "
            f"{loss['llama.cpp']['base']:.3f} -> {loss['llama.cpp']['adapter']:.3f}, loraplex "
            f"{loss['loraplex']['base']:.3f} -> {loss['loraplex']['adapter']:.3f}")


def main() -> None:  # pragma: no cover - console entry for `python -m loraplex`
    app(prog_name="loraplex")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
