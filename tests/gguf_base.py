"""The tiny random Llama of conftest.py written as a GGUF file the way llama.cpp's convert_hf_to_gguf.py writes a
Llama (float32 tensors, q/k rows permuted, gpt2-style vocabulary), and a model folder marked as converted from it,
as loraplex marks the folders it converts GGUF files into."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from loraplex.llamacpp.lora import permute_rows
from loraplex.models import COMPLETE_MARKER


def write_tiny_gguf(model_dir: Path, path: Path) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    n_blocks, heads, kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(n_blocks)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(float(config["rope_parameters"]["rope_theta"] if "rope_parameters" in config
                                    else config["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = dict(tokenizer["model"]["vocab"]) | {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    specials = {t["content"] for t in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(["Ġ Ġ"])  # llama.cpp's gpt2 vocabulary needs one; ids are fed directly anyway
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    for name, array in load_file(model_dir / "model.safetensors").items():
        tensor = names.get_name(name, try_suffixes=(".weight",))
        array = array.astype(np.float32)
        if tensor.endswith("attn_q.weight"):
            array = permute_rows(array, heads)
        elif tensor.endswith("attn_k.weight"):
            array = permute_rows(array, kv)
        writer.add_tensor(tensor, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def converted_base(model_dir: Path, gguf_path: Path, dest: Path) -> Path:
    """A copy of the model folder whose marker names `gguf_path` as its source (what `convert_gguf` leaves)."""
    shutil.copytree(model_dir, dest)
    (dest / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path)}) + "\n")
    return dest
