"""`loraplex.export`: a run for other serving software, one entry point over both formats (`vllm_export`: the
`vllm serve` command; `llamacpp.export`: llama.cpp GGUF LoRA files, Ollama Modelfiles, a merged model as GGUF)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path

from .errors import ParameterError
from .llamacpp.export import GgufExport, export_gguf
from .vllm_export import VllmExport, export_vllm


class ExportFormat(str, Enum):
    VLLM = "vllm"  # the `vllm serve` command (printed, or written to `out` as a shell script)
    GGUF = "gguf"  # llama.cpp LoRA files + Ollama Modelfiles in the folder `out` (default RUN/gguf)


# the options only one format reads (the others are shared: out, force)
_FORMAT_OPTIONS = {ExportFormat.VLLM: {"lora_target_modules"},
                   ExportFormat.GGUF: {"adapters", "merged", "merged_type", "verify", "rows"}}
_DEFAULTS = {"lora_target_modules": None, "adapters": None, "merged": None, "merged_type": "f16", "verify": False,
             "rows": 16}


def export(run_dir: str | Path, to: ExportFormat | str, *, out: str | Path | None = None, force: bool = False,
           lora_target_modules: list[str] | None = None, adapters: list[str] | None = None,
           merged: str | Path | None = None, merged_type: str = "f16", verify: bool = False,
           rows: int = 16) -> VllmExport | GgufExport:
    """Export the run's finished adapters to `to`; an existing output is replaced only with `force`.

    `to=ExportFormat.VLLM` (or "vllm"): returns the `VllmExport` (its `text()` is the script), written to the file
    `out` when given; `lora_target_modules` restricts vLLM's LoRA layers to those modules.
    `to=ExportFormat.GGUF` (or "gguf"): writes `adapters` (default: every finished one) into the folder `out`
    (default RUN/gguf), `merged` (a folder `merge` wrote) as one `merged_type` GGUF file, and with `verify` the
    llama.cpp round trip on `rows` held-out rows per adapter; returns the `GgufExport` (the paths written).
    """
    fmt = _format(to)
    given = {"lora_target_modules": lora_target_modules, "adapters": adapters, "merged": merged,
             "merged_type": merged_type, "verify": verify, "rows": rows}
    foreign = [name for name, value in given.items()
               if name not in _FORMAT_OPTIONS[fmt] and value != _DEFAULTS[name]]
    if foreign:
        raise ParameterError(foreign[0], f"the {fmt.value} export does not read it; leave it out "
                                         f"(it is an option of to={_other(fmt).value!r})")
    if fmt is ExportFormat.VLLM:
        return export_vllm(run_dir, out, lora_target_modules, force=force)
    return export_gguf(run_dir, adapters, merged, merged_type, out, force=force, verify=verify, rows=rows)


def _format(to: ExportFormat | str) -> ExportFormat:
    try:
        return ExportFormat(to)
    except ValueError:
        raise ParameterError("to", f"{to!r} is not an export format; choose one of "
                                   f"{', '.join(repr(f.value) for f in ExportFormat)}") from None


def _other(fmt: ExportFormat) -> ExportFormat:
    return ExportFormat.GGUF if fmt is ExportFormat.VLLM else ExportFormat.VLLM
