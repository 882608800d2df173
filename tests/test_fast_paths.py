"""Training's CPU speed paths, each against the plain computation it replaces, in float32 and bfloat16
(dtypes forced, so the tests mean the same on CPUs with and without native bf16): the LM head's in-place
cross-entropy, the decoder forward that skips the head, LoRA dropout's shared cheap mask, and float32
attention for short bf16 sequences."""
from __future__ import annotations

from dataclasses import replace
import pytest
import torch

from loraplex.models import load_model, resolve_base
from loraplex.lm import packed as batching
from loraplex.lm.packed import PackedCollator, answer_loss_sum
from loraplex.lm.dropout import LEVELS, DropoutShare, LoraDropout, use_lora_dropout

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def features(lengths=(9, 14, 6), vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


def lora_model(model_dir, dtype, dropout=0.0, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(resolve_base(str(model_dir)), dtype=dtype),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets),
                                      init_lora_weights=False))
    return model.train()


def loss_and_grads(model, batch):
    model.zero_grad()
    loss, _, _ = answer_loss_sum(model, batch, accuracy=False)
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(a, b, dtype):
    assert a[0] == pytest.approx(b[0], rel=TOL[dtype]["rtol"])
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_head_loss_equals_autograd_cross_entropy(tiny_model_dir, monkeypatch, dtype):
    model = lora_model(tiny_model_dir, dtype)
    batch = PackedCollator()(features())
    monkeypatch.setattr(batching, "KERNELS", replace(batching.KERNELS, head_chunk_elements=5 * 260))  # several chunks
    in_place = loss_and_grads(model, batch)
    with torch.no_grad():
        _, count, correct = answer_loss_sum(model, batch)
    monkeypatch.setattr(batching, "KERNELS", replace(batching.KERNELS, in_place_head_loss=False))
    reference = loss_and_grads(model, batch)
    with torch.no_grad():
        _, count_ref, correct_ref = answer_loss_sum(model, batch)
    assert_close(in_place, reference, dtype)
    assert (count, correct) == (count_ref, correct_ref) and count > 0
    assert any(g.abs().sum() > 0 for g in in_place[1].values())


def test_the_decoder_forward_runs_no_head_rows_and_training_skips_accuracy(tiny_model_dir):
    model = lora_model(tiny_model_dir, torch.float32)
    head = model.get_base_model().get_output_embeddings()
    rows = []
    handle = head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        batch = PackedCollator()(features())
        loss, count, correct = answer_loss_sum(model, batch, accuracy=False)
        assert correct == 0 and sum(rows) == count  # no extra row for the model's own logits
        with torch.no_grad():
            _, _, correct = answer_loss_sum(model, batch)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        assert correct == int((logits[:, :-1].argmax(-1) == targets)[keep].sum())
    finally:
        handle.remove()


def test_the_answer_loss_reads_the_head_weight_only_inside_the_heads_forward(tiny_model_dir, monkeypatch):
    """As under FSDP or ZeRO-3: the head's weight is whole only from its forward pre-hook to its forward hook (here
    it holds zeros outside); the loss, its gradients and the correct count are those of the plain head, in every
    chunking."""
    model = lora_model(tiny_model_dir, torch.float32)
    batch = PackedCollator()(features())
    monkeypatch.setattr(batching, "KERNELS", replace(batching.KERNELS, head_chunk_elements=5 * 260))  # several chunks
    reference = loss_and_grads(model, batch)
    with torch.no_grad():
        _, _, correct_ref = answer_loss_sum(model, batch)
    head = model.get_base_model().get_output_embeddings()
    whole = head.weight.detach().clone()

    def gather(module, args):
        module.weight.data = whole

    def release(module, args, out):
        module.weight.data = torch.zeros_like(whole)

    release(head, None, None)
    head.register_forward_pre_hook(gather)
    head.register_forward_hook(release)
    sharded_like = loss_and_grads(model, batch)
    with torch.no_grad():
        _, _, correct = answer_loss_sum(model, batch)
    assert_close(sharded_like, reference, torch.float32)
    assert correct == correct_ref and float(head.weight.abs().max()) == 0  # released after each forward


# --------------------------------------------------------------------------- dropout


def test_lora_dropout_rate_scale_and_gradient():
    d = LoraDropout(0.25, DropoutShare()).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = d(x)
    dropped = float((y == 0).float().mean())
    assert d.p == 0.25 and abs(dropped - 0.25) < 0.002  # 4.6 sigma at 10^6 draws
    kept = y[y != 0]
    assert torch.all(kept == 1 / 0.75)
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, torch.where(y != 0, 2 / 0.75, 0.0))
    torch.manual_seed(0)
    assert torch.equal(LoraDropout(0.25, DropoutShare()).train()(x), y)  # the global seed decides the mask
    other = d(x * 3)  # other values: another mask
    assert not torch.equal(other == 0, y == 0) and abs(float((other == 0).float().mean()) - 0.25) < 0.002
    assert d.eval()(x) is x
    assert LoraDropout(0.05, DropoutShare()).p == round(0.05 * LEVELS) / LEVELS


def test_a_changed_input_gets_a_new_mask():
    d = LoraDropout(0.5, DropoutShare()).train()
    x = torch.randn(64, 64)
    first = d(x) == 0
    assert torch.equal(d(x.clone()) == 0, first)  # equal values: the same mask
    x.add_(1.0)  # the same tensor, changed in place
    assert not torch.equal(d(x) == 0, first)


@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_reading_one_input_share_one_mask(tiny_model_dir, dtype):
    model = lora_model(tiny_model_dir, dtype, dropout=0.5, targets=("q_proj", "k_proj", "v_proj", "up_proj",
                                                                     "gate_proj", "down_proj"))
    assert use_lora_dropout(model) == 12  # 6 modules x 2 layers
    inputs, outputs = {}, {}
    def record(name):
        def hook(module, args, out):
            inputs.setdefault(name, args[0])
            outputs.setdefault(name, out)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, LoraDropout):
            module.register_forward_hook(record(name))
    model(**{k: v for k, v in PackedCollator()(features()).items() if k != "labels"})

    def dropped(layer, module):  # where the mask dropped an element (of the nonzero inputs)
        name = next(n for n in outputs if f"layers.{layer}." in n and f".{module}." in n)
        return (outputs[name] == 0) & (inputs[name] != 0)
    # PEFT keeps float32 adapter weights on a bf16 base: each module gets its own float32 copy of the input
    assert torch.equal(dropped(0, "q_proj"), dropped(0, "k_proj"))
    assert torch.equal(dropped(0, "q_proj"), dropped(0, "v_proj"))
    assert torch.equal(dropped(0, "gate_proj"), dropped(0, "up_proj"))
    assert not torch.equal(dropped(0, "up_proj"), dropped(0, "down_proj"))
    assert not torch.equal(dropped(1, "q_proj"), dropped(0, "q_proj"))
    assert 0.4 < float(dropped(0, "q_proj").float().mean()) < 0.6


def test_no_dropout_keeps_the_identity(tiny_model_dir):
    model = lora_model(tiny_model_dir, torch.float32, dropout=0.0)
    assert use_lora_dropout(model) == 0


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("lengths", [(9, 14, 6), (14,)])
def test_short_bf16_sequences_attend_in_float32(tiny_model_dir, monkeypatch, lengths):
    import transformers.integrations.sdpa_attention as sdpa

    batch = PackedCollator()(features(lengths))
    reference = loss_and_grads(lora_model(tiny_model_dir, torch.float32), batch)  # a float32 model
    model = lora_model(tiny_model_dir, torch.bfloat16)
    seen, inner = [], sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward",
                        lambda module, q, *a, **k: seen.append((q.shape[2], q.dtype)) or inner(module, q, *a, **k))
    monkeypatch.setattr(batching, "KERNELS", replace(batching.KERNELS, float32_attention_below=10))
    mixed = loss_and_grads(model, batch)
    n = len(lengths)
    assert seen[:n] == [(t, torch.float32 if t < 10 else torch.bfloat16) for t in lengths]
    monkeypatch.setattr(batching, "KERNELS", replace(batching.KERNELS, float32_attention_below=0))
    seen.clear()
    plain = loss_and_grads(model, batch)
    assert seen[:n] == [(t, torch.bfloat16) for t in lengths]

    def error(result):  # largest gradient error against the float32 model, relative to the gradient's size
        return max(float((result[1][k] - g).abs().max() / g.abs().max()) for k, g in reference[1].items())
    assert mixed[0] == pytest.approx(reference[0], rel=1e-2) and plain[0] == pytest.approx(reference[0], rel=1e-2)
    assert error(mixed) < 0.1 and error(mixed) <= 1.5 * error(plain)  # float32 attention is no worse than bf16
