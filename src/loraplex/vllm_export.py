"""`loraplex export vllm`: the `vllm serve` command that serves a run's base with every adapter of the run.

vLLM's limits, as its source states them: `--max-lora-rank` takes one of MAX_LORA_RANKS (vllm/config/lora.py;
recent releases also accept 1, older ones start at 8, so 8 is the smallest value used here) and must cover every
adapter's rank; an adapter with DoRA (`use_dora`) or `modules_to_save` is refused when it loads
(vllm/lora/peft_helper.py), and vLLM reads only lora_A/lora_B tensors, so trained biases, embeddings or a
saved head would be lost. Every problem is reported before anything is written.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_text
from .errors import LoraplexError, ParameterError
from .inspect_adapter import AdapterWeights, read_adapter
from .lora_settings import loftq_problem
from .models import COMPLETE_MARKER
from .run import adapter_dir, complete_adapters, compose_problems, read_recipe

MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class VllmExport:
    """The command, what it was built from, and the warnings that do not stop it."""

    command: list[str]  # argv of `vllm serve ...`
    base: str
    adapters: dict[str, Path]
    max_lora_rank: int
    target_modules: list[str]
    notes: list[str] = field(default_factory=list)  # shell comments above the command
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"# {note}" for note in self.notes]
        argv = [shlex.quote(a) for a in self.command]
        # one flag (with its values) per line: `vllm serve BASE`, then each --flag
        parts, current = [], argv[:3]
        for arg in argv[3:]:
            if arg.startswith("--"):
                parts.append(" ".join(current))
                current = [arg]
            else:
                current.append(arg)
        parts.append(" ".join(current))
        return "\n".join(lines + [" \\\n  ".join(parts)]) + "\n"


def max_rank(adapter: AdapterWeights) -> int:
    """The largest rank of any module (rank_pattern can raise it above the config's r)."""
    ranks = [m.A.shape[0] for m in adapter.modules.values()]
    return max(ranks + [int(adapter.config.get("r") or 0)])


def adapter_problems(name: str, adapter: AdapterWeights) -> list[str]:
    """What vLLM would refuse in this adapter, one line each with the fix."""
    problems = loftq_problem(name, adapter.meta, "that `vllm serve` loads")
    if adapter.use_dora:
        problems.append(f"{name}: trained with DoRA (use_dora), which vLLM does not support; train it again with "
                        f"datasets.{name}.lora.use_dora=false, or merge it (`loraplex merge`) and serve the merged "
                        "folder as a plain model")
    if adapter.config.get("modules_to_save"):
        problems.append(f"{name}: has modules_to_save ({', '.join(adapter.config['modules_to_save'])}), which vLLM "
                        "refuses; train it without modules_to_save, or merge it and serve the merged folder")
    if adapter.extra_keys:
        shown = ", ".join(adapter.extra_keys[:3]) + (f" and {len(adapter.extra_keys) - 3} more"
                                                     if len(adapter.extra_keys) > 3 else "")
        problems.append(f"{name}: holds tensors other than LoRA A/B ({shown}), which vLLM would not load; train it "
                        "with bias=none and no trained embeddings or head, or merge it and serve the merged folder")
    rank = max_rank(adapter)
    if rank > MAX_LORA_RANKS[-1]:
        problems.append(f"{name}: rank {rank} is above vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]}); "
                        f"train it again with datasets.{name}.lora.r={MAX_LORA_RANKS[-1]} or less")
    return problems


def base_note(location: str) -> str:
    """Where the base is, said so that the user knows what vLLM will load."""
    marker = Path(location) / COMPLETE_MARKER
    if marker.is_file():
        try:
            source = json.loads(marker.read_text(encoding="utf-8")).get("source", "a GGUF file")
        except (json.JSONDecodeError, UnicodeDecodeError):
            source = "a GGUF file"
        return (f"base model: {location} is a safetensors folder loraplex converted from {source}; vLLM loads "
                "this folder (copy it to the serving machine along with the adapters)")
    if Path(location).is_dir():
        return f"base model: the local folder {location} (the serving machine needs it at this path)"
    return f"base model: {location} (a hub id: vLLM downloads it)"


def _restricted_by(entries: list[str], module: str) -> bool:
    """Would vLLM's --lora-target-modules ENTRIES cover this module (a leaf name, or a regex on the full name)?"""
    leaf = module.rsplit(".", 1)[-1]
    for entry in entries:
        if entry == leaf:
            return True
        try:
            if re.fullmatch(entry, module):
                return True
        except re.error:
            continue
    return False


def vllm_command(run_dir: str | Path, lora_target_modules: list[str] | None = None) -> VllmExport:
    """The `vllm serve` command for the run's adapters, after checking each against vLLM's limits.

    With `lora_target_modules`, the command restricts vLLM's LoRA layers to those (`--lora-target-modules`, a
    memory saving of recent vLLM releases) and warns about each adapter module it would leave out.
    """
    run_dir = Path(run_dir).resolve()
    read_recipe(run_dir)  # refuses a folder that is not a run
    names = complete_adapters(run_dir)
    if not names:
        raise LoraplexError(f"{run_dir} has no finished adapter; train one with `loraplex train RECIPE`")
    adapters = {name: read_adapter(adapter_dir(run_dir, name)) for name in names}
    problems = [line for name, adapter in adapters.items() for line in adapter_problems(name, adapter)]
    problems += compose_problems({name: adapter_dir(run_dir, name) for name in names})
    locations = {name: a.meta.get("base_model_location") for name, a in adapters.items()}
    known = sorted({loc for loc in locations.values() if loc})
    if not known:
        problems.append("no adapter records its base model (base_model_location in loraplex.json); "
                        "train the adapters again with loraplex")
    elif len(known) > 1:
        by = ", ".join(f"{name}: {loc}" for name, loc in locations.items())
        problems.append(f"the adapters were trained on different base models ({by}); vLLM serves one base: "
                        "export runs whose adapters share a base")
    for name, loc in locations.items():
        if not loc and known:
            problems.append(f"{name}: its loraplex.json records no base model; train it again with loraplex")
    if problems:
        raise LoraplexError(problems, title=f"{len(problems)} problem(s) stop vLLM from serving {run_dir}")

    base = known[0]
    rank = next(r for r in MAX_LORA_RANKS if r >= max(max_rank(a) for a in adapters.values()))
    targets = sorted({m.leaf for a in adapters.values() for m in a.modules.values()})
    folders = {name: a.adapter_dir.resolve() for name, a in adapters.items()}
    command = ["vllm", "serve", base, "--enable-lora", "--lora-modules",
               *[f"{name}={folder}" for name, folder in folders.items()],
               "--max-lora-rank", str(rank), "--max-loras", str(len(adapters))]
    warnings = []
    if lora_target_modules:
        command += ["--lora-target-modules", *lora_target_modules]
        for name, adapter in adapters.items():
            left = sorted({m.leaf for m in adapter.modules.values() if not _restricted_by(lora_target_modules, m.name)})
            if left:
                warnings.append(f"{name}: targets {', '.join(left)}, which --lora-target-modules "
                                f"{' '.join(lora_target_modules)} leaves out: vLLM would serve {name} without them; "
                                f"add them, or drop --lora-target-modules")
    ranks = ", ".join(f"{name} r={max_rank(a)}" for name, a in adapters.items())
    notes = [f"vLLM command for the run {run_dir} ({len(adapters)} adapter(s)), written by `loraplex export vllm`",
             base_note(base),
             f"target modules of the adapters (union): {', '.join(targets)}"
             + ("" if lora_target_modules else f"; recent vLLM can save memory with --lora-target-modules "
                                               f"{' '.join(targets)}"),
             f"--max-lora-rank {rank}: the smallest value vLLM accepts ({', '.join(map(str, MAX_LORA_RANKS))}) "
             f"that covers {ranks}",
             "requests pick an adapter with \"model\": \"<name>\"; the base model answers to its path"]
    return VllmExport(command, base, folders, rank, targets, notes, warnings)


def export_vllm(run_dir: str | Path, out: str | Path | None = None,
                lora_target_modules: list[str] | None = None, force: bool = False) -> VllmExport:
    """Build the command and, with `out`, write it there as a shell script (comments + command); an existing `out`
    is replaced only with `force`."""
    export = vllm_command(run_dir, lora_target_modules)
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise ParameterError("out", f"{out} is a folder; pass a file name, e.g. {out / 'serve_vllm.sh'}")
        if out.exists() and not force:
            raise ParameterError("out", f"{out} exists; choose another file, or pass force=True to replace it")
        atomic_write_text(out, "#!/bin/sh\n" + export.text())
    return export
