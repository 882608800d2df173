"""One adapter as a GGUF LoRA file, laid out the way llama.cpp's convert_lora_to_gguf.py writes it.

Tensors: `blk.N.attn_q.weight.lora_a` [r, in] and `...lora_b` [out, r] (numpy order; GGUF lists the dimensions
reversed), named by gguf's tensor map of the base's architecture. Metadata: general.type=adapter, adapter.type=lora,
adapter.lora.alpha. llama.cpp scales each pair by alpha / r, r being that pair's rank (llama-adapter.h, get_scale),
so a module whose PEFT scaling differs (rsLoRA's alpha/√r, alpha_pattern) carries the ratio in its B.

llama.cpp's converter permutes the rows of Llama's q_proj and k_proj weights (convert_hf_to_gguf.py,
LlamaModel.permute: per head, the two rotary halves interleaved), so a GGUF base holds permute(W_q), and the LoRA
delta B@A follows it when the rows of B are permuted the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..inspect_adapter import AdapterWeights
from ..models import COMPLETE_MARKER

ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # config.json model_type -> the llama.cpp architecture
PERMUTED = {"attn_q.weight": "n_head", "attn_k.weight": "n_head_kv"}  # GGUF tensor -> heads its rows are grouped by


@dataclass(frozen=True)
class GgufTarget:
    """What a LoRA file must match: the base's llama.cpp architecture, its heads, its tensors."""

    arch: str  # general.architecture, e.g. "llama"
    n_blocks: int
    n_head: int
    n_head_kv: int
    tensors: dict[str, tuple[int, ...]]  # base tensor name -> shape [out, in]; {} where the base is not a GGUF file
    gguf_path: Path | None  # the base GGUF file, if the base is one

    def tensor_name(self, module: str) -> str | None:
        """`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q.weight` (None: llama.cpp has no such tensor)."""
        import gguf

        arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[self.arch]
        found = gguf.get_tensor_name_map(arch, self.n_blocks).get_name(module)
        return f"{found}.weight" if found else None


def base_gguf_file(location: str) -> Path | None:
    """The GGUF file a base folder was converted from (loraplex's marker says), or None."""
    marker = Path(location) / COMPLETE_MARKER
    if not marker.is_file():
        return None
    source = json.loads(marker.read_text(encoding="utf-8")).get("source")
    return Path(source) if source and Path(source).is_file() else None


def target_from_gguf(path: Path) -> GgufTarget:
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()

    def value(key: str) -> int:
        field = reader.fields.get(f"{arch}.{key}")
        if field is None:
            raise ModelError(f"{path}: the GGUF metadata has no {arch}.{key}; re-create the file with llama.cpp's "
                             "convert_hf_to_gguf.py")
        return int(field.contents())

    heads = value("attention.head_count")
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    tensors = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    return GgufTarget(arch, value("block_count"), heads, int(kv.contents()) if kv else heads, tensors, path)


def target_from_config(folder: Path) -> GgufTarget:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type", "?")
    heads = int(config.get("num_attention_heads", 0))
    return GgufTarget(ARCHITECTURES.get(model_type, model_type), int(config.get("num_hidden_layers", 0)), heads,
                      int(config.get("num_key_value_heads") or heads), {}, None)


def gguf_target(location: str) -> GgufTarget:
    """The base at `location` (a folder, maybe converted from GGUF) as llama.cpp sees it."""
    source = base_gguf_file(location)
    if source is not None:
        return target_from_gguf(source)
    if (Path(location) / "config.json").is_file():
        return target_from_config(Path(location))
    raise ModelError(f"base model {location}: GGUF export needs the base on this machine (a GGUF file or a model "
                     "folder); train with model.path set to a local folder or .gguf file")


def lora_problems(name: str, adapter: AdapterWeights, target: GgufTarget) -> list[str]:
    """What llama.cpp cannot apply in this adapter, one line each with the reason and the fix."""
    merge_hint = (f"or merge it into the base (`merge`, adapters=['{name}']) and export the merged folder "
                  "(merged=<folder>)")
    if target.arch not in set(ARCHITECTURES.values()):
        return [f"{name}: its base has the architecture '{target.arch}'; loraplex writes GGUF LoRA files for "
                f"Llama-architecture bases ({', '.join(sorted(ARCHITECTURES))}), whose q/k layout it checks; "
                "use llama.cpp's convert_lora_to_gguf.py for this one"]
    problems = []
    if adapter.use_dora:
        problems.append(f"{name}: trained with DoRA (use_dora); llama.cpp applies only A and B, not DoRA's "
                        f"per-row magnitude, so it would compute another model; train it with "
                        f"datasets.{name}.lora.use_dora=false, {merge_hint}")
    extra = list(adapter.extra_keys) + [f"modules_to_save: {m}" for m in adapter.config.get("modules_to_save") or []]
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        problems.append(f"{name}: holds tensors other than LoRA A/B of linear layers ({shown}); a llama.cpp LoRA "
                        f"file holds only those; train it with bias=none and no trained embeddings or head, "
                        f"{merge_hint}")
    for module in adapter.modules.values():
        tensor = target.tensor_name(module.name)
        shape = tuple(module.delta().shape)
        if tensor is None:
            problems.append(f"{name}: module {module.name} has no llama.cpp tensor; train without it")
        elif target.tensors and tensor not in target.tensors:
            problems.append(f"{name}: module {module.name} maps to {tensor}, which the base GGUF "
                            f"{target.gguf_path} does not hold (a tied output layer, say); train without it")
        elif target.tensors and target.tensors[tensor] != shape:
            problems.append(f"{name}: module {module.name} is {list(shape)} but the base GGUF's {tensor} is "
                            f"{list(target.tensors[tensor])}: the adapter was trained on another base")
    return problems


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation of the first axis: [n_head, 2, d/2, ...] -> [n_head, d/2, 2, ...]."""
    return (rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def lora_tensors(adapter: AdapterWeights, target: GgufTarget) -> dict[str, np.ndarray]:
    """`<tensor>.lora_a` [r, in] and `<tensor>.lora_b` [out, r], float32, such that (alpha / r)·B@A is the
    module's PEFT delta in the GGUF base's row order."""
    alpha = float(adapter.config["lora_alpha"])
    tensors = {}
    for module in adapter.modules.values():
        tensor = target.tensor_name(module.name)
        A = module.A.float().numpy()
        rank = A.shape[0]
        B = module.B.float().numpy() * (module.scaling / (alpha / rank))  # 1.0 for plain LoRA
        heads = next((getattr(target, h) for suffix, h in PERMUTED.items() if tensor.endswith(suffix)), None)
        if heads:
            B = permute_rows(B, heads)
        tensors[f"{tensor}.lora_a"] = np.ascontiguousarray(A)
        tensors[f"{tensor}.lora_b"] = np.ascontiguousarray(B)
    return tensors


def write_lora_gguf(adapter: AdapterWeights, target: GgufTarget, path: Path) -> Path:
    """Write the adapter as a llama.cpp LoRA file at `path` (through a temporary name: never half a file)."""
    import gguf

    problems = lora_problems(adapter.name, adapter, target)
    if problems:
        raise ModelError(problems, title=f"llama.cpp cannot apply the adapter {adapter.name}")
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, target.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.config["lora_alpha"]))
    writer.add_name(adapter.name)
    for name, array in lora_tensors(adapter, target).items():
        writer.add_tensor(name, array)
    return finish_gguf(writer, tmp, path)


def finish_gguf(writer, tmp: Path, path: Path) -> Path:
    """Writes a filled GGUFWriter's header, metadata and tensors to `tmp`, then puts the file at `path` in one step."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
