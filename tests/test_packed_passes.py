"""Speed paths of training that must not change the numbers: per-sequence attention on packed rows,
micro-batch passes, and the chunked LM head (values and LoRA gradients equal the plain computation)."""
from __future__ import annotations

from dataclasses import replace
import pytest
import torch

from loraplex.models import load_model, resolve_base
from loraplex.lm import packed as batching
from loraplex.lm.packed import PackedCollator, answer_loss_sum, split_packed

LENGTHS = (7, 12, 5, 9)


def features(lengths=LENGTHS, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]
        out.append({"input_ids": ids, "labels": labels, "source": f"f.jsonl line {n}"})
    return out


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(resolve_base(str(tiny_model_dir))),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    model.train()
    return model


def loss_and_grads(model, batches, **kwargs):
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss, _, _ = answer_loss_sum(model, batch, **kwargs)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6)


def test_per_sequence_attention_equals_the_block_diagonal_mask(lora_model, monkeypatch):
    calls = []
    packed_sdpa = batching._packed_sdpa
    monkeypatch.setattr(batching, "_packed_sdpa", lambda *a, **k: calls.append(1) or packed_sdpa(*a, **k))
    batch = PackedCollator()(features())
    per_sequence = loss_and_grads(lora_model, [batch])
    assert len(calls) == 2  # one call per layer of the tiny model
    assert_same(per_sequence, loss_and_grads(lora_model, [batch], per_sequence_attention=False))
    assert len(calls) == 2
    assert batching.causal_lm(lora_model).config._attn_implementation == "sdpa"  # restored after the pass


def test_split_passes_add_up_to_the_whole_batch(lora_model):
    feats = features()
    batch = PackedCollator()(feats)
    batch["sources"] = [f["source"] for f in feats]
    parts = split_packed(batch, 20)
    assert [p["input_ids"].shape[1] for p in parts] == [19, 14]  # whole sequences, at most 20 tokens unless alone
    assert [p["sources"] for p in parts] == [["f.jsonl line 7", "f.jsonl line 12"],
                                             ["f.jsonl line 5", "f.jsonl line 9"]]
    assert split_packed(batch, None) == [batch] and len(split_packed(batch, 1)) == len(LENGTHS)
    strip = [{k: v for k, v in p.items() if k != "sources"} for p in parts]
    whole = {k: v for k, v in batch.items() if k != "sources"}
    assert_same(loss_and_grads(lora_model, strip), loss_and_grads(lora_model, [whole]))


def test_chunked_head_equals_one_pass(lora_model, monkeypatch):
    batch = PackedCollator()(features())
    reference = loss_and_grads(lora_model, [batch])
    # 3 rows per chunk for a vocab of ~260
    monkeypatch.setattr(batching, "KERNELS", replace(batching.KERNELS, head_chunk_elements=3 * 260))
    assert_same(loss_and_grads(lora_model, [batch]), reference)
    with torch.no_grad():
        loss, count, correct = answer_loss_sum(lora_model, batch)
    assert float(loss) == pytest.approx(reference[0], rel=1e-5) and count == sum(n - n // 2 for n in LENGTHS)
