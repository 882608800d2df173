"""`loraplex export gguf`: each adapter of a run as a llama.cpp LoRA file with an Ollama Modelfile beside it, a
merged model as one GGUF file, and (with `verify`) the llama.cpp round trip of each adapter.

```
<out>/<adapter>/lora.gguf        the LoRA file (llama-cli -m BASE.gguf --lora lora.gguf; Ollama's ADAPTER)
<out>/<adapter>/Modelfile        `ollama create <adapter> -f Modelfile`
<out>/<adapter>/llama_cpp_check.json   with verify: the round trip's figures
<out>/<merged folder>.<type>.gguf     with merged
```
Every problem is reported before anything is written; an existing file is replaced only with `force`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_json, atomic_write_text
from ..data.render import chat_template_for, end_of_turn_ids
from ..errors import LoraplexError, ParameterError, unknown_name_message
from ..inspect_adapter import AdapterWeights, read_adapter
from ..run import adapter_dir, complete_adapters, compose_problems, gguf_dir, open_run, read_recipe
from .lora import GgufTarget, gguf_target, lora_problems, write_lora_gguf
from .merged import OUT_TYPES, write_merged_gguf
from .modelfile import modelfile_text

LORA_FILE, MODELFILE, CHECK_FILE = "lora.gguf", "Modelfile", "llama_cpp_check.json"


@dataclass
class GgufExport:
    out_dir: Path
    base_gguf: Path | None  # the base as a GGUF file (None: the base is a model folder)
    loras: dict[str, Path] = field(default_factory=dict)
    modelfiles: dict[str, Path] = field(default_factory=dict)
    merged: Path | None = None
    checks: dict = field(default_factory=dict)  # adapter -> RoundTrip


def _chosen(run_dir: Path, names: list[str] | None) -> list[str]:
    complete = complete_adapters(run_dir)
    if not complete:
        raise LoraplexError(f"{run_dir} has no finished adapter; train one with `loraplex train RECIPE`")
    unknown = [unknown_name_message("adapter", n, complete) for n in names or [] if n not in complete]
    if unknown:
        raise LoraplexError([f"adapters: {line}" for line in unknown])
    return list(names) if names else complete


def _shared_base(adapters: dict[str, AdapterWeights]) -> str:
    locations = {name: a.meta.get("base_model_location") for name, a in adapters.items()}
    unrecorded = [name for name, loc in locations.items() if not loc]
    if unrecorded:
        raise LoraplexError(f"{', '.join(unrecorded)}: loraplex.json records no base model; "
                            "train it again with loraplex")
    if len(set(locations.values())) > 1:
        by = ", ".join(f"{name}: {loc}" for name, loc in locations.items())
        raise LoraplexError(f"the adapters were trained on different base models ({by}); export them one at a time "
                            "(adapters=[...])")
    return next(iter(locations.values()))


def _outputs(out_dir: Path, names: list[str], merged_file: Path | None, force: bool) -> None:
    existing = [out_dir / n / f for n in names for f in (LORA_FILE, MODELFILE) if (out_dir / n / f).exists()]
    existing += [merged_file] if merged_file is not None and merged_file.exists() else []
    if existing and not force:
        raise ParameterError("out", f"{existing[0]} exists; choose another folder, or pass force=True to replace "
                            f"{'it' if len(existing) == 1 else f'the {len(existing)} files'}")


def _modelfile(ws, name: str, run_dir: Path, target: GgufTarget, location: str) -> str:
    spec = next((d for d in ws.recipe.datasets if d.name == name), None)
    template = chat_template_for(ws.tokenizer, spec.template if spec else None)
    stop = [ws.tokenizer.decode([i]) for i in sorted(end_of_turn_ids(ws.tokenizer, template))]
    base = str(target.gguf_path) if target.gguf_path else location
    return modelfile_text(name, run_dir, base, f"./{LORA_FILE}", template, spec.system if spec else None, stop)


def export_gguf(run_dir: str | Path, adapters: list[str] | None = None, merged: str | Path | None = None,
                merged_type: str = "f16", out: str | Path | None = None, force: bool = False,
                verify: bool = False, rows: int = 16) -> GgufExport:
    """Write the run's adapters (all finished ones, or `adapters`) as GGUF LoRA files and Modelfiles into `out`
    (default runs/<run>/gguf), `merged` (a merged model folder) as a GGUF file; `verify` runs the llama.cpp round
    trip of each adapter on `rows` held-out prompts of its dataset."""
    run_dir = Path(run_dir).resolve()
    read_recipe(run_dir)  # refuses a folder that is not a run
    names = _chosen(run_dir, adapters)
    weights = {name: read_adapter(adapter_dir(run_dir, name)) for name in names}
    location = _shared_base(weights)
    target = gguf_target(location)
    problems = [line for name, adapter in weights.items() for line in lora_problems(name, adapter, target)]
    problems += compose_problems({name: adapter_dir(run_dir, name) for name in names})
    if (merged is not None or verify) and target.gguf_path is None:
        problems.append(f"the base {location} is a model folder, not a GGUF file: merged= and verify=True need a GGUF "
                        "base (convert the base with llama.cpp's convert_hf_to_gguf.py and train on it)")
    if merged is not None and merged_type not in OUT_TYPES:
        problems.append(f"merged_type: {merged_type!r}: choose one of {', '.join(OUT_TYPES)}")
    if problems:
        raise LoraplexError(problems, title=f"{len(problems)} problem(s) stop the GGUF export of {run_dir}")
    out_dir = Path(out).resolve() if out is not None else gguf_dir(run_dir)
    merged_file = out_dir / f"{Path(merged).name}.{merged_type}.gguf" if merged is not None else None
    _outputs(out_dir, names, merged_file, force)
    ws = open_run(run_dir)
    result = GgufExport(out_dir, target.gguf_path)
    for name, adapter in weights.items():
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        result.loras[name] = write_lora_gguf(adapter, target, folder / LORA_FILE)
        atomic_write_text(folder / MODELFILE, _modelfile(ws, name, run_dir, target, location))
        result.modelfiles[name] = folder / MODELFILE
    if merged_file is not None:
        result.merged = write_merged_gguf(Path(merged), target.gguf_path, merged_file, merged_type)
    if verify:
        from .verify import round_trip

        for name in names:
            check = round_trip(ws, name, adapter_dir(run_dir, name), target.gguf_path, result.loras[name], rows)
            atomic_write_json(out_dir / name / CHECK_FILE, check.to_dict())
            result.checks[name] = check
    return result
