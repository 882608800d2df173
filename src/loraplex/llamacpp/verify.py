"""The round trip: llama.cpp (through llama-cpp-python) runs the base GGUF with an exported LoRA file, and on held-out
prompts computes what loraplex's `adapters.load(...).use(name)` computes.

Both sides get the same token ids (loraplex's tokenizer), so only the arithmetic differs. loraplex trains on the
GGUF's weights de-quantized exactly, so with the base alone the gap measures llama.cpp's own arithmetic on the
quantized weights (on CPU a Q4_1 matmul rounds its activations to 8 bits); the LoRA file must not widen it much.
Figures: greedy continuations token for token, the mean |Δ log-prob| of each answer token (base alone, base +
adapter), and the held-out loss (mean negative log-likelihood of the answer tokens) of base and adapter on each side.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import LoraplexError
from ..evaluation import load_test_split
from ..adapters import load
from ..data.render import chat_template_for, end_of_turn_ids

LLAMA_CPP_HINT = ("llama-cpp-python is not installed; install it with `pip install llama-cpp-python` (it builds "
                  "llama.cpp from source with cmake and a C++ compiler, about 15 minutes on 2 cores)")


@dataclass
class Sequence:
    prompt: list[int]  # the rendered prompt's token ids, up to the answer
    answer: list[int]  # the reference answer's ids, its end-of-turn token last


@dataclass
class Side:
    """One runtime's results on the sequences: per answer token log-probs, and greedy continuations."""

    logprobs: list[np.ndarray] = field(default_factory=list)
    greedy: list[list[int]] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return float(-np.concatenate(self.logprobs).mean())


@dataclass
class RoundTrip:
    adapter: str
    rows: int
    answer_tokens: int
    greedy_agreement: float  # share of prompts whose greedy continuation is token-identical
    base_gap: float  # mean |Δ log-prob| per answer token, llama.cpp vs loraplex, base alone
    adapter_gap: float  # the same with the adapter
    max_adapter_gap: float
    loss: dict[str, dict[str, float]]  # {"loraplex" | "llama.cpp": {"base": ..., "adapter": ...}}
    samples: list[dict[str, str]]  # question, loraplex's answer, llama.cpp's answer

    def to_dict(self) -> dict:
        return asdict(self)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def answer_logprobs(logits: np.ndarray, seq: Sequence) -> np.ndarray:
    """log p(answer token i | everything before it) from logits [len(prompt + answer), vocab]."""
    start = len(seq.prompt)
    rows = _log_softmax(logits[start - 1: start - 1 + len(seq.answer)])
    return rows[np.arange(len(seq.answer)), seq.answer]


def loraplex_side(model, sequences: list[Sequence], stop: int, max_new_tokens: int) -> Side:
    side = Side()
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq.prompt + seq.answer])
            side.logprobs.append(answer_logprobs(model(input_ids=ids).logits[0].float().numpy(), seq))
            out = model.generate(input_ids=torch.tensor([seq.prompt]), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=stop,
                                 temperature=None, top_p=None, top_k=None)
            side.greedy.append(out[0, len(seq.prompt):].tolist())
    return side


def llama_cpp_side(gguf_path: Path, lora_path: Path | None, sequences: list[Sequence], stop: int,
                   max_new_tokens: int) -> Side:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise LoraplexError(LLAMA_CPP_HINT) from None
    longest = max(len(s.prompt) + max(len(s.answer), max_new_tokens) for s in sequences)
    llm = Llama(model_path=str(gguf_path), lora_path=str(lora_path) if lora_path else None, n_ctx=longest + 8,
                logits_all=True, n_threads=os.cpu_count() or 1, seed=0, verbose=False)
    side = Side()
    try:
        for seq in sequences:
            llm.reset()
            llm.eval(seq.prompt + seq.answer)
            side.logprobs.append(answer_logprobs(np.array(llm.scores[: llm.n_tokens]), seq))
            llm.reset()
            llm.eval(seq.prompt)
            generated: list[int] = []
            while len(generated) < max_new_tokens:
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                generated.append(token)
                if token == stop:
                    break
                llm.eval([token])
            side.greedy.append(generated)
    finally:
        llm.close()
    return side


def held_out_sequences(ws, name: str, rows: int) -> tuple[list[Sequence], list[str], int]:
    """(sequences, questions, the end-of-turn id) from the first `rows` of the dataset's test split."""
    spec = next((d for d in ws.recipe.datasets if d.name == name), None)
    if spec is None:
        raise LoraplexError(f"the run's recipe has no dataset '{name}' whose test rows could check its adapter")
    tokenizer = ws.tokenizer
    split = load_test_split(spec, ws.recipe, tokenizer, limit=rows)
    if not split.prompts:
        raise LoraplexError(f"dataset '{name}' has no test rows (test_path); the round trip needs held-out prompts")
    stops = end_of_turn_ids(tokenizer, chat_template_for(tokenizer, spec.template)) or {tokenizer.eos_token_id}
    stop = min(stops)
    sequences = [Sequence(tokenizer(p, add_special_tokens=False)["input_ids"],
                          tokenizer(r, add_special_tokens=False)["input_ids"] + [stop])
                 for p, r in zip(split.prompts, split.references)]
    return sequences, split.questions, stop


def round_trip(ws, name: str, adapter_dir: Path, gguf_base: Path, lora_path: Path, rows: int = 16,
               max_new_tokens: int = 24) -> RoundTrip:
    """Compare llama.cpp's base GGUF + `lora_path` with loraplex's base + adapter on `rows` held-out prompts."""
    sequences, questions, stop = held_out_sequences(ws, name, rows)
    adapter_set = load(ws.base, {name: adapter_dir}, dtype="float32")
    ours = {"base": loraplex_side(adapter_set.use(None).model, sequences, stop, max_new_tokens),
            "adapter": loraplex_side(adapter_set.use(name).model, sequences, stop, max_new_tokens)}
    theirs = {"base": llama_cpp_side(gguf_base, None, sequences, stop, max_new_tokens),
              "adapter": llama_cpp_side(gguf_base, lora_path, sequences, stop, max_new_tokens)}

    def gaps(kind: str) -> np.ndarray:
        return np.abs(np.concatenate(ours[kind].logprobs) - np.concatenate(theirs[kind].logprobs))

    agree = [a == b for a, b in zip(ours["adapter"].greedy, theirs["adapter"].greedy)]
    decode = ws.tokenizer.decode
    samples = [{"question": q, "loraplex": decode(a, skip_special_tokens=True).strip(),
                "llama.cpp": decode(b, skip_special_tokens=True).strip()}
               for q, a, b in zip(questions, ours["adapter"].greedy, theirs["adapter"].greedy)]
    return RoundTrip(name, len(sequences), int(sum(len(s.answer) for s in sequences)), float(np.mean(agree)),
                     float(gaps("base").mean()), float(gaps("adapter").mean()), float(gaps("adapter").max()),
                     {"loraplex": {k: side.loss for k, side in ours.items()},
                      "llama.cpp": {k: side.loss for k, side in theirs.items()}}, samples)
