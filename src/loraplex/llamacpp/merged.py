"""A merged model (`loraplex merge`'s folder) as one GGUF file: the base GGUF's metadata (architecture, tokenizer,
chat template) kept as it is, each of its tensors replaced by the merged weight in llama.cpp's layout, stored as
f16, bf16 or q8_0 (norms stay f32, as llama.cpp's converter keeps them). Only a base that is a GGUF file has that
metadata to keep; a merged model of another base is converted with llama.cpp's own convert_hf_to_gguf.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ParameterError
from .lora import PERMUTED, finish_gguf, permute_rows, target_from_gguf

OUT_TYPES = ("f16", "bf16", "q8_0")


def read_merged(merged_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(merged_dir.glob("*.safetensors"))
    if not files:
        raise ParameterError("merged", f"{merged_dir}: no *.safetensors in it; pass a folder `merge` wrote "
                            "(runs/<run>/merged/<name>)")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights |= load_file(file)
    return weights


def _copy_metadata(reader, writer, out_type: str) -> None:
    import gguf

    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(file_types[out_type])


def _stored(array: np.ndarray, out_type: str):
    """(data, raw GGML type) of one tensor: 1-D tensors (norms) in f32, matrices in `out_type`."""
    import gguf

    if array.ndim == 1:
        return array.astype(np.float32), None
    if out_type == "f16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if out_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def _source_names(weights: dict[str, torch.Tensor], target) -> dict[str, str]:
    """GGUF tensor name -> the merged folder's tensor name."""
    found = {}
    for key in weights:
        name = target.tensor_name(key.removesuffix(".weight")) if key.endswith(".weight") else None
        if name:
            found[name] = key
    return found


def write_merged_gguf(merged_dir: Path, base_gguf: Path, path: Path, out_type: str = "f16") -> Path:
    """Write the merged folder's weights into a copy of `base_gguf`'s layout at `path` (via a temporary name)."""
    import gguf

    if out_type not in OUT_TYPES:
        raise ParameterError("merged_type", f"{out_type!r}: choose one of {', '.join(OUT_TYPES)}")
    weights = read_merged(merged_dir)
    target = target_from_gguf(base_gguf)
    sources = _source_names(weights, target)
    missing = [t for t in target.tensors if t not in sources]
    wrong = [f"{t} {list(weights[sources[t]].shape)} (the base has {list(shape)})"
             for t, shape in target.tensors.items() if t in sources and tuple(weights[sources[t]].shape) != shape]
    if missing or wrong:
        shown = ", ".join((missing + wrong)[:3])
        raise ParameterError("merged", f"{merged_dir} is not a merge of the base {base_gguf}: {shown}; pass the merged "
                            "folder of this run's adapters")
    reader = gguf.GGUFReader(base_gguf)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, target.arch)
    _copy_metadata(reader, writer, out_type)
    for tensor in reader.tensors:  # the base's order
        array = weights[sources[tensor.name]].float().numpy()
        heads = next((getattr(target, h) for suffix, h in PERMUTED.items() if tensor.name.endswith(suffix)), None)
        if heads:
            array = permute_rows(array, heads)
        data, raw = _stored(np.ascontiguousarray(array), out_type)
        writer.add_tensor(tensor.name, data, raw_dtype=raw)
    return finish_gguf(writer, tmp, path)
