"""Training speed: a notebook-style HF Trainer + PEFT baseline against loraplex's default path, in one run.

Every configuration trains the same LoRA (r=16, alpha=32, dropout 0.05, q_proj + v_proj, same seed) on the
same tokenized examples (loraplex's answer-only labels), for the same optimizer steps over the same
examples (B examples per step; the baseline as batch 1 x B gradient-accumulation steps, as notebooks do).
Each configuration runs in its own subprocess, so its peak RSS is its own; on CPU the processes take
turns step by step (round robin), so load from other processes on the machine falls on all of them alike.

    .venv/bin/python benchmarks/train_speed.py --out results.json
    .venv/bin/python benchmarks/train_speed.py --steps 2 --configs loraplex,loraplex-masked --dataset zh

Configurations (`--configs`, comma-separated; `--levers` adds the lever variants):
  baseline-bf16  HF Trainer + PEFT, batch 1, bf16=True (on a CPU: autocast to bf16), the model's own loss
  loraplex       loraplex.training.trainer.make_trainer with the recipe defaults (only batch_size/max_steps set):
                 packed rows of at most max(max_seq_length, 512) tokens per pass (on CPU), per-sequence
                 attention, LM head on answer positions only, in chunks
  baseline-fp32  the baseline with bf16=False
  levers:        loraplex-masked (the whole batch in one packed row with transformers' block-diagonal mask:
                 loraplex's path before this benchmark), loraplex-seq (one sequence per pass: batch 1 x B
                 accumulation), loraplex-one-pass (the whole batch in one packed row), loraplex-mb1024
                 (micro_batch_tokens 1024), loraplex-full-logits (the model's own loss: LM head on every
                 position), loraplex-one-head-pass (LM head over all answer tokens at once, not in chunks),
                 loraplex-padded (padded batches, same examples), loraplex-grouped (padded, grouped by length:
                 other examples per step), loraplex-1thread (torch.set_num_threads(1))

FLOPs per sequence of T tokens with h LM-head positions (printed with the table; see benchmarks/README.md):
  forward  2*N_base*T + 2*N_lora*T + 4*L*d*T^2 + 2*V*d*h
  backward 2*N_base*T + 4*N_lora*T + 8*L*d*T^2 + 2*V*d*h   (frozen base and head: activation gradients only)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
FILES = {"zh": "alpaca_zh_demo.json", "en": "alpaca_en_demo.json"}
DEFAULT_CONFIGS = ["baseline-bf16", "loraplex", "baseline-fp32"]
LEVERS = ["loraplex-masked", "loraplex-seq", "loraplex-one-pass", "loraplex-mb1024", "loraplex-full-logits",
          "loraplex-one-head-pass", "loraplex-padded", "loraplex-grouped", "loraplex-1thread"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
SEED = 42


# --------------------------------------------------------------------------- data and model


def prepare(args) -> "datasets.Dataset":  # noqa: F821
    """loraplex's tokenized examples (answer-only labels) of the chosen files, first `rows` rows each."""
    import datasets

    from loraplex.data.prepare import prepare_all
    from loraplex.models import load_tokenizer, resolve_base
    from loraplex.recipe import Recipe

    names = ["zh", "en"] if args.dataset == "mixed" else [args.dataset]
    ref = resolve_base("default")
    recipe = Recipe.model_validate({"model": {"path": ref.location}, "datasets": [
        {"name": n, "path": str(Path(args.data_dir) / FILES[n]), "max_samples": args.rows,
         "max_seq_length": args.max_seq_length, "val_size": 0} for n in names]})
    prepared = prepare_all(recipe, load_tokenizer(ref))
    return datasets.concatenate_datasets([prepared[n].train for n in names])


def build_model(args, dtype):
    """(model, tokenizer-less reference name): the embedded SmolLM2 or a random Llama-3-8B-shaped model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.model_config == "llama3-8b":
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             rope_theta=500000.0, tie_word_embeddings=False)
        device = "meta" if args.device == "meta" else args.device
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    from loraplex.models import resolve_base

    location = resolve_base("default").location
    # dtype None = the notebook's plain from_pretrained (the checkpoint's float32 weights)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(location, use_safetensors=True, **kwargs)
    return model.to(args.device) if args.device != "cpu" else model


def flop_params(peft_model) -> dict:
    """What the FLOP formula needs: frozen matmul weights, LoRA weights, layers, attention width, head."""
    from torch import nn

    lm = peft_model.get_base_model()
    head = lm.get_output_embeddings()
    n_base = sum(m.weight.numel() for name, m in lm.named_modules()
                 if isinstance(m, nn.Linear) and m is not head and "lora_" not in name)
    n_lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    c = lm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"n_base": n_base, "n_lora": n_lora, "layers": c.num_hidden_layers,
            "attn_width": c.num_attention_heads * head_dim, "vocab": head.weight.shape[0],
            "hidden": head.weight.shape[1]}


def sequence_flops(p: dict, tokens: int, head_positions: int) -> float:
    fwd = (2 * p["n_base"] * tokens + 2 * p["n_lora"] * tokens + 4 * p["layers"] * p["attn_width"] * tokens**2
           + 2 * p["vocab"] * p["hidden"] * head_positions)
    bwd = (2 * p["n_base"] * tokens + 4 * p["n_lora"] * tokens + 8 * p["layers"] * p["attn_width"] * tokens**2
           + 2 * p["vocab"] * p["hidden"] * head_positions)
    return fwd + bwd


# --------------------------------------------------------------------------- trainers


def baseline_trainer(args, bf16: bool, data, out_dir: str):
    """The notebook: plain from_pretrained, get_peft_model, Trainer with batch 1 and the model's own loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    from loraplex.models import load_tokenizer, resolve_base

    model = build_model(args, None)
    set_seed(SEED)
    peft_model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                  target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    training_args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=1, gradient_accumulation_steps=args.batch_size,
        max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, seed=SEED,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, bf16=bf16,
        use_cpu=args.device == "cpu")
    tokenizer = load_tokenizer(resolve_base("default"))
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=data.select_columns(["input_ids", "labels"]),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    trainer.remove_callback(PrinterCallback)  # keeps the benchmark's output readable
    return trainer, peft_model


def loraplex_trainer(args, variant: str, data, out_dir: str):
    """loraplex's default path: pick_dtype('auto') weights, its LoRA config, make_trainer."""
    from peft import get_peft_model
    from transformers import set_seed

    from loraplex.data.prepare import PreparedDataset
    from loraplex.models import pick_dtype
    from loraplex.recipe import DatasetSpec
    from loraplex.training.runner import lora_config
    from loraplex.training.trainer import make_trainer

    train = {"batch_size": args.batch_size, "max_steps": args.steps, "logging_steps": 1, "save_steps": 10**6}
    whole_batch = {"micro_batch_tokens": 10**9}
    train.update({"loraplex-masked": {"packed_attention": "masked", **whole_batch},
                  "loraplex-seq": {"batch_size": 1, "grad_accum": args.batch_size},
                  "loraplex-one-pass": whole_batch, "loraplex-mb1024": {"micro_batch_tokens": 1024},
                  "loraplex-padded": {"packing": False}, "loraplex-grouped": {"packing": False}}.get(variant, {}))
    spec = DatasetSpec(name="bench", path="unused", target_modules=LORA["target_modules"],
                       max_seq_length=args.max_seq_length,
                       lora={"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"]}, train=train)
    model = build_model(args, pick_dtype("auto"))
    set_seed(SEED)
    peft_model = get_peft_model(model, lora_config(spec))
    trainer, _ = make_trainer(peft_model, spec, PreparedDataset("bench", data, None, {}, Path(out_dir), ""),
                              Path(out_dir), model_dtype=model.dtype, progress=False)
    if variant == "loraplex-grouped":
        trainer.args.train_sampling_strategy = "group_by_length"
    if variant == "loraplex-full-logits":
        trainer.compute_loss = _full_logits_loss(trainer)
    return trainer, peft_model


def _full_logits_loss(trainer):
    """The model's own loss (LM head on every position), still with per-sequence attention."""
    from loraplex.training.batching import packed_attention, real_tokens
    from loraplex.training.trainer import SOURCES_KEY

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop(SOURCES_KEY, None)
        with packed_attention(model, inputs):
            out = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
        trainer.stats.tokens += real_tokens(inputs)
        return out.loss
    return compute_loss


# --------------------------------------------------------------------------- the child process


def sequences_of(inputs) -> list[list[int]]:
    """[tokens, LM-head targets, crc32 of the ids] of every sequence in a batch (packed or padded)."""
    import torch

    ids, labels = inputs["input_ids"].cpu(), inputs["labels"].cpu()
    if "attention_mask" in inputs:
        rows = [(ids[i, m], labels[i, m]) for i, m in enumerate(inputs["attention_mask"].cpu().bool())]
    else:
        starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        rows = [(ids[0, a:b], labels[0, a:b]) for a, b in zip(starts, starts[1:])]
    return [[len(i), int((lab[1:] != -100).sum()), zlib.crc32(i.to(torch.int64).numpy().tobytes())] for i, lab in rows]


def child_main(conn, args, name: str) -> None:
    import torch
    from transformers import TrainerCallback

    if name == "loraplex-1thread":
        torch.set_num_threads(1)
    if name == "loraplex-one-head-pass":
        from loraplex.training import batching

        batching.HEAD_CHUNK_ELEMENTS = 2**62  # the whole [answer tokens, vocab] logits in one chunk
    started = time.perf_counter()
    data = prepare(args)
    out_dir = tempfile.mkdtemp(prefix=f"train-speed-{name}-")
    if name.startswith("baseline"):
        trainer, peft_model = baseline_trainer(args, name == "baseline-bf16", data, out_dir)
    else:
        trainer, peft_model = loraplex_trainer(args, name, data, out_dir)
    log = {"steps": [], "loss": [], "wait_s": 0.0, "seqs": [], "largest_pass": 0}
    inner_step, inner_loss = trainer.training_step, trainer.compute_loss

    def recording_step(model, inputs, num_items_in_batch=None):  # one call per batch
        log["seqs"] += sequences_of(inputs)
        return inner_step(model, inputs, num_items_in_batch)

    def recording_loss(model, inputs, *a, **kw):  # one call per forward pass (padding included)
        log["largest_pass"] = max(log["largest_pass"], inputs["input_ids"].numel())
        return inner_loss(model, inputs, *a, **kw)

    trainer.training_step, trainer.compute_loss = recording_step, recording_loss

    class Gate(TrainerCallback):  # one optimizer step per "go" from the parent
        def on_step_begin(self, a, state, control, **kw):
            waited = time.perf_counter()
            conn.recv()
            log["wait_s"] += time.perf_counter() - waited
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            seconds = time.perf_counter() - self.t0
            if args.device == "cuda":
                torch.cuda.synchronize()
                seconds = time.perf_counter() - self.t0
            log["steps"].append({"step": state.global_step, "seconds": seconds, "seqs": log["seqs"],
                                 "cpu_seconds": time.process_time() - self.cpu0})
            log["seqs"] = []
            conn.send({"event": "step", "step": state.global_step, "seconds": seconds})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log["loss"].append({"step": state.global_step, "loss": float(logs["loss"])})

    trainer.add_callback(Gate())
    dtype = str(next(peft_model.parameters()).dtype).replace("torch.", "")
    conn.send({"event": "ready", "setup_s": time.perf_counter() - started, "setup_peak_rss_mb": _peak_rss_mb(),
               "flop_params": flop_params(peft_model), "weights_dtype": dtype, "threads": torch.get_num_threads()})
    t0 = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t0 - log["wait_s"]
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else _peak_rss_mb()
    conn.send({"event": "done", "train_wall_s": train_wall, "peak_mb": peak, "steps": log["steps"],
               "loss_curve": log["loss"], "largest_pass_tokens": log["largest_pass"]})
    conn.close()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------- matmul peak


def matmul_peak(device: str, dtype_name: str, seconds: float = 0.4) -> float:
    """Best GFLOP/s of square matmuls (torch.mm and F.linear, several sizes) in `dtype_name`."""
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    sizes = (1024, 2048) if dtype == torch.float32 or device != "cpu" else (512,)
    if device == "cuda":
        sizes = (4096, 8192)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for op in (torch.mm, F.linear):
            op(a, b)
            _sync(device)
            t0, reps = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                op(a, b)
                reps += 1
            _sync(device)
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the parent


def run(args) -> dict:
    import torch

    torch.manual_seed(0)
    prepare(args)  # tokenize once (cached) before the children read it
    peaks = {"float32": [matmul_peak(args.device, "float32")], "bfloat16": [matmul_peak(args.device, "bfloat16")]}
    groups = []
    for i, names in enumerate(args.groups):
        print(f"group {i + 1}/{len(args.groups)}: {', '.join(names)}", flush=True)
        groups.append(run_group(args, names, peaks))
    peaks["float32"].append(matmul_peak(args.device, "float32"))
    peaks["bfloat16"].append(matmul_peak(args.device, "bfloat16"))
    peak = {k: max(v) for k, v in peaks.items()}
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "args": vars(args), "machine": _machine(args),
            "matmul_peak_gflop_s": peak, "matmul_probes_gflop_s": peaks,
            "groups": [summarize(g, peak) for g in groups]}


def run_group(args, names: list[str], peaks: dict) -> dict:
    """One subprocess per configuration; on CPU they take turns step by step, on a GPU one after another."""
    ctx = mp.get_context("spawn")
    children, ready, results = {}, {}, {}
    interleave = args.device == "cpu"
    for name in names:
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=child_main, args=(child_end, args, name), daemon=True)
        proc.start()
        children[name] = (proc, parent_end)
        ready[name] = _expect(parent_end, "ready", name)
        print(f"  {name}: ready in {ready[name]['setup_s']:.0f} s", flush=True)
        if not interleave:  # one at a time (a GPU holds one 8B model at a time)
            results.update(_drive(args, {name: children[name]}, peaks))
    if interleave:
        results = _drive(args, children, peaks)
    for proc, _ in children.values():
        proc.join(timeout=60)
    return {"names": names, "ready": ready, "results": results}


def _drive(args, children: dict, peaks: dict) -> dict:
    """Round robin: one optimizer step of each child in turn, a matmul probe after each round."""
    order = list(children)
    done: dict[str, dict] = {}
    for step in range(args.steps):
        for name in order[step % len(order):] + order[:step % len(order)]:
            _, conn = children[name]
            conn.send("go")
            msg = _expect(conn, "step", name)
            print(f"  step {step + 1}/{args.steps} {name}: {msg['seconds']:.1f} s", flush=True)
        peaks["float32"].append(matmul_peak(args.device, "float32", 0.25))
    for name in order:
        done[name] = _expect(children[name][1], "done", name)
    return done


def _expect(conn, event: str, name: str) -> dict:
    try:
        msg = conn.recv()
    except EOFError:
        raise SystemExit(f"configuration {name} died (see its traceback above)") from None
    if msg.get("event") != event:
        raise SystemExit(f"configuration {name}: expected {event}, got {msg}")
    return msg


def summarize(group: dict, peak: dict) -> dict:
    rows = {}
    for name in group["names"]:
        r, info = group["results"][name], group["ready"][name]
        p = info["flop_params"]
        full_head = name.startswith("baseline") or name == "loraplex-full-logits"
        seqs = [s for step in r["steps"] for s in step["seqs"]]
        tokens = sum(s[0] for s in seqs)
        flops = sum(sequence_flops(p, s[0], s[0] if full_head else s[1]) for s in seqs)
        seconds = sum(step["seconds"] for step in r["steps"])
        compute_dtype = "bfloat16" if name == "baseline-bf16" or info["weights_dtype"] == "bfloat16" else "float32"
        rows[name] = {
            "tokens": tokens, "answer_tokens": sum(s[1] for s in seqs), "step_seconds": seconds,
            "tokens_per_s": tokens / seconds, "train_wall_s": r["train_wall_s"], "setup_s": info["setup_s"],
            "peak_mb": r["peak_mb"], "setup_peak_rss_mb": info["setup_peak_rss_mb"],
            "largest_pass_tokens": r["largest_pass_tokens"],
            "final_loss": r["loss_curve"][-1]["loss"] if r["loss_curve"] else None, "loss_curve": r["loss_curve"],
            "weights_dtype": info["weights_dtype"], "compute_dtype": compute_dtype, "threads": info["threads"],
            "model_tflop": flops / 1e12, "achieved_gflop_s": flops / seconds / 1e9,
            "mfu": flops / seconds / 1e9 / peak[compute_dtype], "flop_params": p,
            "step_seconds_each": [step["seconds"] for step in r["steps"]],
            "cpu_seconds_per_token": sum(step["cpu_seconds"] for step in r["steps"]) / tokens,
            "examples_per_step": [[s[2] for s in step["seqs"]] for step in r["steps"]],
        }
    return {"configs": rows, "ratios": ratios(rows)}


def ratios(rows: dict) -> dict:
    """Each configuration against each reference of its group (the baselines, else loraplex)."""
    refs = [n for n in ("baseline-bf16", "baseline-fp32") if n in rows] or [n for n in ("loraplex",) if n in rows]
    out = {}
    for name, row in rows.items():
        for ref in refs:
            if ref == name:
                continue
            b = rows[ref]
            per_step = [t_ref / t for t, t_ref in zip(row["step_seconds_each"], b["step_seconds_each"])]
            out[f"{name} / {ref}"] = {
                "tokens_per_s": row["tokens_per_s"] / b["tokens_per_s"], "peak_mb": row["peak_mb"] / b["peak_mb"],
                "median_step_speedup": statistics.median(per_step),
                "cpu_time_speedup": b["cpu_seconds_per_token"] / row["cpu_seconds_per_token"],
                "final_loss": row["final_loss"] / b["final_loss"] if row["final_loss"] and b["final_loss"] else None,
                "same_examples_per_step": [sorted(s) for s in row["examples_per_step"]]
                == [sorted(s) for s in b["examples_per_step"]]}
    return out


def _machine(args) -> dict:
    import platform

    import torch

    info = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "loadavg_at_end": os.getloadavg()}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --------------------------------------------------------------------------- output


def print_report(res: dict) -> None:
    peak = res["matmul_peak_gflop_s"]
    print(f"\nmatmul peak measured in this run: float32 {peak['float32']:.1f} GFLOP/s, bfloat16 {peak['bfloat16']:.1f} "
          f"GFLOP/s (best of {len(res['matmul_probes_gflop_s']['float32'])} fp32 probes)")
    for i, group in enumerate(res["groups"]):
        if len(res["groups"]) > 1:
            print(f"\ngroup {i + 1} (its configurations took turns step by step)")
        print_group(group, res["args"]["device"])
    p = next(iter(res["groups"][0]["configs"].values()))["flop_params"]
    print(f"\nFLOPs per sequence of T tokens, h LM-head positions (h = T for the model's own loss, h = answer tokens "
          f"for loraplex):\n  4*N_base*T + 6*N_lora*T + 12*L*d*T^2 + 4*V*H*h   with N_base={p['n_base']:,} "
          f"N_lora={p['n_lora']:,} L={p['layers']} d={p['attn_width']} V={p['vocab']:,} H={p['hidden']}\n"
          "  (forward 2N per matmul weight; backward of a frozen weight = activation gradient only (2N), LoRA weights "
          "4N;\n  attention 4*L*d*T per token forward, twice that backward, causal half not subtracted)\n"
          "  MFU = model FLOPs / step time / measured matmul peak of the compute dtype")
    if res["args"]["device"] == "cpu" and any("baseline-bf16" in g["configs"] for g in res["groups"]):
        print("  note: bf16=True on this CPU means autocast to bfloat16; without AVX512-BF16/AMX the bf16 matmuls "
              "run several times slower than float32, which is what makes the notebook baseline slow here")


def print_group(group: dict, device: str) -> None:
    memory = "peak MB" if device == "cpu" else "GPU MB"
    header = (f"{'config':<24}{'weights':>9}{'compute':>9}{'tokens':>8}{'tok/s':>8}{'train s':>9}{memory:>9}"
              f"{'pass':>6}{'loss':>8}{'GFLOP/s':>9}{'MFU':>7}")
    print(header)
    print("-" * len(header))
    for name, r in group["configs"].items():
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        print(f"{name:<24}{r['weights_dtype'][:7]:>9}{r['compute_dtype'][:7]:>9}{r['tokens']:>8}"
              f"{r['tokens_per_s']:>8.1f}{r['train_wall_s']:>9.1f}{r['peak_mb']:>9.0f}{r['largest_pass_tokens']:>6}{loss:>8}"
              f"{r['achieved_gflop_s']:>9.1f}{100 * r['mfu']:>6.1f}%")
    print(f"ratios{'':<38}{'tok/s':>8}{'median':>8}{'CPU s':>8}{'peak':>8}{'loss':>9}  same examples each step")
    for key, r in group["ratios"].items():
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] else "-"
        print(f"  {key:<42}{r['tokens_per_s']:>8.2f}{r['median_step_speedup']:>8.2f}{r['cpu_time_speedup']:>8.2f}"
              f"{r['peak_mb']:>8.2f}{loss:>9}  {r['same_examples_per_step']}")
    names = list(group["configs"])
    steps = sorted({p["step"] for r in group["configs"].values() for p in r["loss_curve"]})
    print("loss per step\n  step " + "".join(f"{n[:22]:>24}" for n in names))
    for s in steps:
        vals = [next((p["loss"] for p in group["configs"][n]["loss_curve"] if p["step"] == s), None) for n in names]
        print(f"  {s:>4} " + "".join(f"{v:>24.4f}" if v is not None else f"{'-':>24}" for v in vals))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with alpaca_zh_demo.json, alpaca_en_demo.json")
    ap.add_argument("--dataset", choices=["mixed", "zh", "en"], default="mixed", help="mixed = both files in one set")
    ap.add_argument("--rows", type=int, default=256, help="first N rows of each file")
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps, the same for every configuration")
    ap.add_argument("--batch-size", type=int, default=2,
                    help="examples per optimizer step (small by default: the bf16 baseline runs ~4 tokens/s here)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated; see the module doc")
    ap.add_argument("--levers", action="store_true", help="also run the lever variants of loraplex, in groups")
    ap.add_argument("--group-size", type=int, default=3, help="configurations alive (and compared) at once")
    ap.add_argument("--device", choices=["cpu", "cuda", "meta"], default="cpu",
                    help="meta: only build the model and print its FLOP parameters")
    ap.add_argument("--model-config", choices=["default", "llama3-8b"], default="default",
                    help="default: SmolLM2-135M-Instruct; llama3-8b: Llama-3-8B shape, random bf16 weights (GPU)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in DEFAULT_CONFIGS + LEVERS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; choose from {DEFAULT_CONFIGS + LEVERS}")
    # at most --group-size processes are alive at once (memory); each lever group repeats loraplex as reference
    per = max(1, args.group_size - 1)
    args.groups = [configs[i:i + args.group_size] for i in range(0, len(configs), args.group_size)]
    if args.levers:
        args.groups += [["loraplex"] + LEVERS[i:i + per] for i in range(0, len(LEVERS), per)]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "meta":
        from peft import LoraConfig, get_peft_model

        model = build_model(args, None)
        peft_model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                      target_modules=LORA["target_modules"]))
        print(json.dumps(flop_params(peft_model)))
        return
    print(f"train_speed: {args.dataset}, {args.rows} rows per file, max_seq_length {args.max_seq_length}, "
          f"{args.steps} steps x {args.batch_size} examples", flush=True)
    res = run(args)
    print_report(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
