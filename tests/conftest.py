"""Shared fixtures: a tiny random Llama (Llama-3 module names) with an offline byte-level tokenizer.

Nothing here touches the network. The tokenizer maps every UTF-8 byte to one token and knows the
ChatML special tokens, so decoded ids round-trip exactly, CJK included.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_byte_tokenizer(chat_template: str | None = CHATML_TEMPLATE,
                        extra_special_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:] + list(extra_special_tokens),
                            "eos_token": "<|im_end|>",
                            "pad_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def make_tiny_model_dir(path: Path, seed: int = 0, chat_template: str | None = CHATML_TEMPLATE,
                        extra_special_tokens: tuple[str, ...] = ()) -> Path:
    tok = make_byte_tokenizer(chat_template, extra_special_tokens)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own LORAPLEX_HOME so caches never leak between tests."""
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "loraplex-home"))


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# Tiny models gain nothing from several threads, and on a shared 2-core machine extra threads make
# them many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """CLI errors print one problem per line: no wrapping inside long paths; no debug tracebacks."""
    from loraplex import cli

    monkeypatch.setattr(cli.console, "_width", 10_000)
    monkeypatch.delenv("LORAPLEX_DEBUG", raising=False)
