"""Training speed: a notebook-style HF Trainer + PEFT baseline against loraplex's default path, in one run,
with the shape-level ceiling of the step and a profile of where loraplex's time goes.

Every configuration trains the same LoRA (r=16, alpha=32, dropout 0.05, q_proj + v_proj, same seed) on the
same tokenized examples (loraplex's answer-only labels) in the same order, B examples per optimizer step
(the baseline as batch 1 x B gradient-accumulation steps, as notebooks do). Each configuration runs in its
own subprocess (its peak RSS is its own); on a CPU the processes take turns step by step, so machine noise
falls on all of them alike. The steps continue until every configuration has spent `--seconds` in them
(the slowest has spent more); each repeat starts fresh processes that run the same steps again, and the
ratios are reported as the median and range over the repeats.

    .venv/bin/python benchmarks/train_speed.py --out results.json          # ~60 s+ per config, 3 repeats
    .venv/bin/python benchmarks/train_speed.py --seconds 10 --repeats 1    # a quick look
    .venv/bin/python benchmarks/train_speed.py --configs loraplex,loraplex-torch-dropout --seconds 20

Configurations (`--configs`, comma-separated; `--levers` adds the lever variants in groups with loraplex):
  baseline-bf16  HF Trainer + PEFT, batch 1, bf16=True (on a CPU: autocast to bf16), the model's own loss;
                 run by default only where bf16 is native (else it is ~10-30x slower than float32)
  loraplex       loraplex.training.trainer.make_trainer with the recipe defaults (only batch_size/max_steps set)
  baseline-fp32  the baseline with bf16=False
  levers:        loraplex-torch-dropout (PEFT's nn.Dropout per module instead of loraplex's shared cheap mask),
                 loraplex-bf16-attention (short sequences' attention in bf16 too, not float32),
                 loraplex-autograd-head (the head's cross-entropy through autograd, not in place), loraplex-masked
                 (one packed row with transformers' block-diagonal mask), loraplex-seq (one sequence per pass),
                 loraplex-one-pass (the whole batch in one pass), loraplex-mb1024 (1024-token passes),
                 loraplex-full-logits (LM head on every position), loraplex-one-head-pass (LM head unchunked),
                 loraplex-padded (padded batches), loraplex-grouped (padded, grouped by length: other
                 examples per step), loraplex-1thread (torch.set_num_threads(1)), loraplex-eager / loraplex-compiled
                 (train.compile: off / on; the compiled configuration's first step includes compiling, from an
                 empty inductor cache when TORCHINDUCTOR_CACHE_DIR points at one)

Ceiling (speed_ceiling.py): the model's own products timed alone at the shapes each configuration's passes
used, summed; printed against the step time. Profile: `--profile-steps` steps of loraplex under
torch.profiler, by category. FLOPs per sequence of T tokens with h LM-head positions (for MFU):
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
import warnings
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
FILES = {"zh": "alpaca_zh_demo.json", "en": "alpaca_en_demo.json"}
CONFIGS = ["baseline-bf16", "loraplex", "baseline-fp32"]
LEVERS = ["loraplex-torch-dropout", "loraplex-bf16-attention", "loraplex-autograd-head", "loraplex-masked",
          "loraplex-seq",
          "loraplex-one-pass",
          "loraplex-mb1024", "loraplex-full-logits", "loraplex-one-head-pass", "loraplex-padded", "loraplex-grouped",
          "loraplex-1thread", "loraplex-eager", "loraplex-compiled"]
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
        max_steps=args.horizon, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, seed=SEED,
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
    from loraplex.device import pick_dtype
    from loraplex.recipe import DatasetSpec
    from loraplex.lm import packed as batching
    from loraplex.training import trainer as trainer_module
    from loraplex.lm.settings import lora_config
    from loraplex.training.trainer import make_trainer

    train = {"batch_size": args.batch_size, "max_steps": args.horizon, "logging_steps": 1, "save_steps": 10**6}
    whole_batch = {"micro_batch_tokens": 10**9}
    train.update({"loraplex-masked": {"packed_attention": "masked", **whole_batch},
                  "loraplex-seq": {"batch_size": 1, "grad_accum": args.batch_size},
                  "loraplex-one-pass": whole_batch, "loraplex-mb1024": {"micro_batch_tokens": 1024},
                  "loraplex-padded": {"packing": False}, "loraplex-grouped": {"packing": False},
                  "loraplex-eager": {"compile": "off"}, "loraplex-compiled": {"compile": "on"}}.get(variant, {}))
    spec = DatasetSpec(name="bench", path="unused", target_modules=LORA["target_modules"],
                       max_seq_length=args.max_seq_length,
                       lora={"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"]}, train=train)
    model = build_model(args, pick_dtype(args.loraplex_dtype))
    set_seed(SEED)
    peft_model = get_peft_model(model, lora_config(spec))
    if variant == "loraplex-torch-dropout":  # PEFT's own nn.Dropout per module
        trainer_module.use_lora_dropout = lambda model: 0
    if variant == "loraplex-bf16-attention":  # every sequence's attention in the weights' dtype
        batching.use_kernels(float32_attention_below=0)
    if variant == "loraplex-autograd-head":  # the LM head's cross-entropy through autograd (F.cross_entropy)
        batching.use_kernels(in_place_head_loss=False)
    trainer, _ = make_trainer(peft_model, spec, PreparedDataset("bench", data, None, {}, Path(out_dir), "", ""),
                              Path(out_dir), progress=False)
    if variant == "loraplex-grouped":
        trainer.args.train_sampling_strategy = "group_by_length"
    if variant == "loraplex-full-logits":
        trainer.compute_loss = _full_logits_loss(trainer)
    return trainer, peft_model


def _full_logits_loss(trainer):
    """The model's own loss (LM head on every position), still with per-sequence attention."""
    from loraplex.lm.packed import packed_attention, real_tokens
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


def build_trainer(args, name: str):
    import torch

    if name == "loraplex-1thread":
        torch.set_num_threads(1)
    if name == "loraplex-one-head-pass":
        from loraplex.lm import packed as batching

        batching.use_kernels(head_chunk_elements=2**62)  # the whole [answer tokens, vocab] logits in one chunk
    data = prepare(args)
    out_dir = tempfile.mkdtemp(prefix=f"train-speed-{name}-")
    if name.startswith("baseline"):
        return baseline_trainer(args, name == "baseline-bf16", data, out_dir)
    return loraplex_trainer(args, name, data, out_dir)


def record_passes(trainer, log: dict, full_head: bool) -> None:
    """Per forward pass (the passes of a step hold its batch's sequences, each once): its sequences (for the
    same-examples check), their lengths and the LM-head positions (for the ceiling)."""
    inner_loss = trainer.compute_loss

    def recording_loss(model, inputs, *a, **kw):  # one call per forward pass (padding included)
        seqs = sequences_of(inputs)
        log["seqs"] += seqs
        lengths = [s[0] for s in seqs]
        log["passes"].append({"lengths": lengths, "head": sum(lengths) if full_head else sum(s[1] for s in seqs)})
        log["largest_pass"] = max(log["largest_pass"], inputs["input_ids"].numel())
        return inner_loss(model, inputs, *a, **kw)

    trainer.compute_loss = recording_loss


def child_main(conn, args, name: str) -> None:
    import torch
    from transformers import TrainerCallback

    from speed_ceiling import model_shapes

    started = time.perf_counter()
    trainer, peft_model = build_trainer(args, name)
    log = {"steps": [], "loss": [], "seqs": [], "passes": [], "largest_pass": 0}
    record_passes(trainer, log, full_head=name.startswith("baseline") or name == "loraplex-full-logits")

    class Gate(TrainerCallback):  # each optimizer step waits for "go"; "stop" ends the training after a step
        def on_train_begin(self, a, state, control, **kw):
            conn.recv()

        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.t0
            log["steps"].append({"step": state.global_step, "seconds": seconds, "seqs": log["seqs"],
                                 "passes": log["passes"], "cpu_seconds": time.process_time() - self.cpu0})
            log["seqs"], log["passes"] = [], []
            conn.send({"event": "step", "step": state.global_step, "seconds": seconds})
            if conn.recv() == "stop":
                control.should_training_stop = True

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log["loss"].append({"step": state.global_step, "loss": float(logs["loss"])})

    trainer.add_callback(Gate())
    dtype = str(next(peft_model.parameters()).dtype).replace("torch.", "")
    conn.send({"event": "ready", "setup_s": time.perf_counter() - started, "setup_peak_rss_mb": _peak_rss_mb(),
               "flop_params": flop_params(peft_model), "shapes": model_shapes(peft_model), "weights_dtype": dtype,
               "threads": torch.get_num_threads()})
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else _peak_rss_mb()
    conn.send({"event": "done", "peak_mb": peak, "steps": log["steps"], "loss_curve": log["loss"],
               "largest_pass_tokens": log["largest_pass"]})
    conn.close()


def profile_main(conn, args, name: str) -> None:
    """`args.profile_steps` optimizer steps of `name` under torch.profiler (after one unprofiled step)."""
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    from speed_ceiling import model_shapes, profile_breakdown

    args.horizon = args.profile_steps + 1
    trainer, peft_model = build_trainer(args, name)
    log = {"seqs": [], "passes": [], "largest_pass": 0}
    record_passes(trainer, log, full_head=name.startswith("baseline") or name == "loraplex-full-logits")
    steps = []

    class Step(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            steps.append({"seconds": time.perf_counter() - self.t0, "passes": log["passes"]})
            log["passes"] = []
            prof.step()

    trainer.add_callback(Step())
    warnings.filterwarnings("ignore", message="Profiler won't be using warmup")  # the first step is skipped instead
    every = schedule(wait=1, warmup=0, active=args.profile_steps)
    with profile(activities=[ProfilerActivity.CPU], schedule=every) as prof:
        trainer.train()
    conn.send({"event": "done", "breakdown": profile_breakdown(prof, args.profile_steps), "steps": steps[1:],
               "shapes": model_shapes(peft_model), "weights_dtype": str(next(peft_model.parameters()).dtype)[6:]})
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
        repeats, steps = [], args.steps
        for r in range(args.repeats):
            print(f"group {i + 1}/{len(args.groups)}, repeat {r + 1}/{args.repeats}: {', '.join(names)}", flush=True)
            repeats.append(run_group(args, names, peaks, steps))
            steps = len(next(iter(repeats[0]["results"].values()))["steps"])  # later repeats: the same steps
        groups.append({"names": names, "repeats": repeats})
    peaks["float32"].append(matmul_peak(args.device, "float32"))
    peaks["bfloat16"].append(matmul_peak(args.device, "bfloat16"))
    peak = {k: max(v) for k, v in peaks.items()}
    res = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "args": {k: v for k, v in vars(args).items()},
           "machine": _machine(args), "matmul_peak_gflop_s": peak, "matmul_probes_gflop_s": peaks,
           "groups": [summarize(g, peak) for g in groups]}
    if args.ceiling:
        print("timing the model's products at the shapes used (ceiling) ...", flush=True)
        add_ceilings(res, groups, args.device)
    if args.profile_steps:
        print(f"profiling {args.profile_steps} steps of {args.profile_config} ...", flush=True)
        res["profile"] = run_profile(args, args.profile_config)
        if args.ceiling:
            from speed_ceiling import Ceiling, step_ceilings

            prof = res["profile"]
            per_step = step_ceilings(Ceiling(prof["shapes"], prof["weights_dtype"], args.device),
                                     [s["passes"] for s in prof["steps"]])
            prof["ceiling"] = {f: sum(s.get(f, 0.0) for s in per_step) / len(per_step)
                               for f in ("linear", "lora", "attention", "lm_head")}
    return res


def run_group(args, names: list[str], peaks: dict, steps: int | None) -> dict:
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
            results.update(_drive(args, {name: children[name]}, peaks, steps or args.gpu_steps))
    if interleave:
        results = _drive(args, children, peaks, steps)
    for proc, _ in children.values():
        proc.join(timeout=60)
    return {"names": names, "ready": ready, "results": results}


def _drive(args, children: dict, peaks: dict, steps: int | None) -> dict:
    """Round robin, one optimizer step of each child in turn, until `steps` steps or, without it, until every
    child has spent `args.seconds` in its steps (or the schedule's horizon is reached)."""
    order = list(children)
    spent = dict.fromkeys(order, 0.0)
    step = 0
    while True:
        for name in order[step % len(order):] + order[:step % len(order)]:
            conn = children[name][1]
            conn.send("go")  # read before the first step, then after each step
            spent[name] += _expect(conn, "step", name)["seconds"]
        step += 1
        last = step == args.horizon or (steps is not None and step >= steps) or (
            steps is None and min(spent.values()) >= args.seconds)
        print(f"  step {step}: " + ", ".join(f"{n} {spent[n]:.0f} s" for n in order), flush=True)
        if step % 5 == 0:
            peaks["float32"].append(matmul_peak(args.device, "float32", 0.25))
        if last:
            break
    for name in order:
        children[name][1].send("stop")
    return {name: _expect(children[name][1], "done", name) for name in order}


def _expect(conn, event: str, name: str) -> dict:
    try:
        msg = conn.recv()
    except EOFError:
        raise SystemExit(f"configuration {name} died (see its traceback above)") from None
    if msg.get("event") != event:
        raise SystemExit(f"configuration {name}: expected {event}, got {msg}")
    return msg


def run_profile(args, name: str) -> dict:
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=profile_main, args=(child_end, args, name), daemon=True)
    proc.start()
    msg = _expect(parent_end, "done", f"{name} (profile)")
    proc.join(timeout=60)
    return {"config": name, **msg}


def config_row(name: str, r: dict, info: dict, peak: dict) -> dict:
    p = info["flop_params"]
    full_head = name.startswith("baseline") or name == "loraplex-full-logits"
    seqs = [s for step in r["steps"] for s in step["seqs"]]
    tokens = sum(s[0] for s in seqs)
    flops = sum(sequence_flops(p, s[0], s[0] if full_head else s[1]) for s in seqs)
    seconds = sum(step["seconds"] for step in r["steps"])
    compute_dtype = "bfloat16" if name == "baseline-bf16" or info["weights_dtype"] == "bfloat16" else "float32"
    return {
        "tokens": tokens, "answer_tokens": sum(s[1] for s in seqs), "steps": len(r["steps"]), "step_seconds": seconds,
        "tokens_per_s": tokens / seconds, "setup_s": info["setup_s"], "peak_mb": r["peak_mb"],
        "setup_peak_rss_mb": info["setup_peak_rss_mb"], "largest_pass_tokens": r["largest_pass_tokens"],
        "final_loss": r["loss_curve"][-1]["loss"] if r["loss_curve"] else None, "loss_curve": r["loss_curve"],
        "weights_dtype": info["weights_dtype"], "compute_dtype": compute_dtype, "threads": info["threads"],
        "model_tflop": flops / 1e12, "achieved_gflop_s": flops / seconds / 1e9,
        "mfu": flops / seconds / 1e9 / peak[compute_dtype], "flop_params": p,
        "step_seconds_each": [step["seconds"] for step in r["steps"]],
        "cpu_seconds_each": [step["cpu_seconds"] for step in r["steps"]],
        "cpu_seconds_per_token": sum(step["cpu_seconds"] for step in r["steps"]) / tokens,
        "examples_per_step": [[s[2] for s in step["seqs"]] for step in r["steps"]],
    }


def summarize(group: dict, peak: dict) -> dict:
    """Per configuration: repeat 1's row, with tokens/s of every repeat; per ratio: every repeat's value."""
    repeats = [{n: config_row(n, rep["results"][n], rep["ready"][n], peak) for n in group["names"]}
               for rep in group["repeats"]]
    configs = {n: {**repeats[0][n], "tokens_per_s_repeats": [rows[n]["tokens_per_s"] for rows in repeats],
                   "peak_mb_repeats": [rows[n]["peak_mb"] for rows in repeats]} for n in group["names"]}
    per_repeat = [ratios(rows) for rows in repeats]
    out = {}
    for key in per_repeat[0]:
        values = [r[key] for r in per_repeat]
        tok = [v["tokens_per_s"] for v in values]
        out[key] = {**values[0], "tokens_per_s": statistics.median(tok), "tokens_per_s_repeats": tok,
                    "peak_mb": statistics.median(v["peak_mb"] for v in values),
                    "same_examples_per_step": all(v["same_examples_per_step"] for v in values)}
    return {"configs": configs, "ratios": out}


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
            losses = {p["step"]: p["loss"] for p in b["loss_curve"]}
            step_loss = [abs(p["loss"] / losses[p["step"]] - 1) for p in row["loss_curve"] if losses.get(p["step"])]
            out[f"{name} / {ref}"] = {
                "tokens_per_s": row["tokens_per_s"] / b["tokens_per_s"], "peak_mb": row["peak_mb"] / b["peak_mb"],
                "median_step_speedup": statistics.median(per_step),
                "cpu_time_speedup": b["cpu_seconds_per_token"] / row["cpu_seconds_per_token"],
                "final_loss": row["final_loss"] / b["final_loss"] if row["final_loss"] and b["final_loss"] else None,
                "max_step_loss_difference": max(step_loss) if step_loss else None,
                "same_examples_per_step": [sorted(s) for s in row["examples_per_step"]]
                == [sorted(s) for s in b["examples_per_step"]]}
    return out


def add_ceilings(res: dict, groups: list[dict], device: str) -> None:
    """Each configuration's ceiling (repeat 1's passes) next to its step time (median over repeats)."""
    from speed_ceiling import Ceiling, step_ceilings

    ceilings: dict[str, Ceiling] = {}
    for group, summary in zip(groups, res["groups"]):
        for name in group["names"]:
            rep = group["repeats"][0]
            info, steps = rep["ready"][name], rep["results"][name]["steps"]
            dtype = summary["configs"][name]["compute_dtype"]
            ceiling = ceilings.setdefault(dtype, Ceiling(info["shapes"], dtype, device))
            per_step = step_ceilings(ceiling, [s["passes"] for s in steps])
            families = {f: sum(s.get(f, 0.0) for s in per_step) for f in ("linear", "lora", "attention", "lm_head")}
            seconds = statistics.median(sum(s["seconds"] for s in r["results"][name]["steps"])
                                        for r in group["repeats"])
            summary["configs"][name]["ceiling"] = {"seconds": sum(families.values()), "families": families,
                                                   "step_seconds_median": seconds,
                                                   "fraction": sum(families.values()) / seconds}


def _machine(args) -> dict:
    import platform

    import torch

    from loraplex.device import bf16_supported

    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        pass
    info = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "loadavg_at_end": os.getloadavg(),
            "cpu_model": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                               if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists()
            else platform.processor(),
            "cpu_features": sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_native": bf16_supported(),
            "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")
                    if k in os.environ}}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --------------------------------------------------------------------------- output


def print_report(res: dict) -> None:
    m, peak = res["machine"], res["matmul_peak_gflop_s"]
    print(f"\nmachine: {m.get('cpu_model')}, {m['cpus']} CPUs, features {' '.join(m.get('cpu_features', [])) or '-'}, "
          f"ATen CPU capability {m.get('aten_cpu_capability')}, native bf16: {m.get('bf16_native')}"
          + (f", env {m['env']}" if m.get("env") else "") + (f", GPU {m['gpu']}" if m.get("gpu") else ""))
    print(f"matmul peak measured in this run: float32 {peak['float32']:.1f} GFLOP/s, bfloat16 {peak['bfloat16']:.1f} "
          f"GFLOP/s (best of {len(res['matmul_probes_gflop_s']['float32'])} fp32 probes)")
    for i, group in enumerate(res["groups"]):
        if len(res["groups"]) > 1:
            print(f"\ngroup {i + 1} (its configurations took turns step by step)")
        print_group(group, res["args"]["device"])
    if any("ceiling" in c for g in res["groups"] for c in g["configs"].values()):
        print_ceilings(res)
    if res.get("profile"):
        print_profile(res["profile"])
    p = next(iter(res["groups"][0]["configs"].values()))["flop_params"]
    print(f"\nFLOPs per sequence of T tokens, h LM-head positions (h = T for the model's own loss, h = answer tokens "
          f"for loraplex):\n  4*N_base*T + 6*N_lora*T + 12*L*d*T^2 + 4*V*H*h   with N_base={p['n_base']:,} "
          f"N_lora={p['n_lora']:,} L={p['layers']} d={p['attn_width']} V={p['vocab']:,} H={p['hidden']}\n"
          "  MFU = model FLOPs / step time / measured matmul peak of the compute dtype")
    for line in summary_lines(res):
        print(line)


def summary_lines(res: dict) -> list[str]:
    """The machine-readable lines: `loraplex / <baseline>: <ratio>x tok/s ...` for each baseline that ran."""
    lines = []
    for group in res["groups"]:
        for ref in ("baseline-bf16", "baseline-fp32"):
            r = group["ratios"].get(f"loraplex / {ref}")
            if r:
                tok = r["tokens_per_s_repeats"]
                lines.append(f"loraplex / {ref}: {r['tokens_per_s']:.2f}x tok/s (median of {len(tok)} repeats, "
                             f"range {min(tok):.2f}-{max(tok):.2f}), {r['peak_mb']:.2f}x peak memory")
    return lines


def print_group(group: dict, device: str) -> None:
    memory = "peak MB" if device == "cpu" else "GPU MB"
    header = (f"{'config':<24}{'weights':>9}{'compute':>9}{'steps':>6}{'tokens':>8}{'tok/s':>8}{'(range)':>14}"
              f"{memory:>9}{'pass':>6}{'loss':>8}{'GFLOP/s':>9}{'MFU':>7}")
    print(header)
    print("-" * len(header))
    for name, r in group["configs"].items():
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        tok = r["tokens_per_s_repeats"]
        spread = f"{min(tok):.0f}-{max(tok):.0f}" if len(tok) > 1 else ""
        print(f"{name:<24}{r['weights_dtype'][:7]:>9}{r['compute_dtype'][:7]:>9}{r['steps']:>6}{r['tokens']:>8}"
              f"{statistics.median(tok):>8.1f}{spread:>14}{max(r['peak_mb_repeats']):>9.0f}"
              f"{r['largest_pass_tokens']:>6}"
              f"{loss:>8}{r['achieved_gflop_s']:>9.1f}{100 * r['mfu']:>6.1f}%")
    print("  (tok/s: median over repeats; the other columns: repeat 1)")
    print(f"ratios{'':<38}{'tok/s':>8}{'(range)':>12}{'median':>8}{'CPU s':>8}{'peak':>7}{'loss':>8}{'max |Δ|':>9}"
          f"  same examples")
    for key, r in group["ratios"].items():
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] else "-"
        diff = f"{100 * r['max_step_loss_difference']:.2f}%" if r["max_step_loss_difference"] is not None else "-"
        tok = r["tokens_per_s_repeats"]
        spread = f"{min(tok):.2f}-{max(tok):.2f}" if len(tok) > 1 else ""
        print(f"  {key:<42}{r['tokens_per_s']:>8.2f}{spread:>12}{r['median_step_speedup']:>8.2f}"
              f"{r['cpu_time_speedup']:>8.2f}{r['peak_mb']:>7.2f}{loss:>8}{diff:>9}  {r['same_examples_per_step']}")
    print("  (median: of per-step speedups in repeat 1; loss: final loss ratio; max |Δ|: largest per-step loss "
          "difference)")
    names = list(group["configs"])
    steps = sorted({p["step"] for r in group["configs"].values() for p in r["loss_curve"]})
    print("loss per step (repeat 1)\n  step " + "".join(f"{n[:22]:>24}" for n in names))
    for s in steps:
        vals = [next((p["loss"] for p in group["configs"][n]["loss_curve"] if p["step"] == s), None) for n in names]
        print(f"  {s:>4} " + "".join(f"{v:>24.4f}" if v is not None else f"{'-':>24}" for v in vals))


def print_ceilings(res: dict) -> None:
    print("\nceiling: the model's products timed alone at the shapes each configuration used (speed_ceiling.py)")
    header = (f"{'config':<24}{'step s':>8}{'ceiling s':>10}{'linear':>8}{'lora':>7}{'attn':>7}{'head':>7}"
              f"{'ceiling / step':>16}")
    print(header)
    print("-" * len(header))
    rows = {n: c for g in res["groups"] for n, c in g["configs"].items() if "ceiling" in c}
    for name, c in rows.items():
        ce = c["ceiling"]
        f = ce["families"]
        print(f"{name:<24}{ce['step_seconds_median']:>8.1f}{ce['seconds']:>10.1f}{f['linear']:>8.1f}{f['lora']:>7.1f}"
              f"{f['attention']:>7.1f}{f['lm_head']:>7.1f}{100 * ce['fraction']:>15.1f}%")
    if "loraplex" in rows:
        for ref in ("baseline-bf16", "baseline-fp32"):
            if ref in rows:
                best = rows[ref]["ceiling"]["step_seconds_median"] / rows["loraplex"]["ceiling"]["seconds"]
                print(f"  {ref} step time / loraplex's ceiling: {best:.2f}x (the most any implementation with these "
                      "kernels could gain over it on these steps)")


def print_profile(p: dict) -> None:
    b = dict(p["breakdown"])
    wall = b.pop("wall")
    if not wall:
        print(f"\nprofile of {p['config']}: the profiler recorded no steps")
        return
    print(f"\nprofile of {p['config']}: {len(p['steps'])} steps under torch.profiler, {wall:.2f} s per step "
          "(profiler overhead included); self time of each op, by category, per step")
    ceiling = p.get("ceiling", {})
    against = {"matmul": sum(ceiling.get(f, 0.0) for f in ("linear", "lora", "lm_head")),
               "attention": ceiling.get("attention", 0.0)}
    for category, seconds in sorted(b.items(), key=lambda kv: -kv[1]):
        note = f"   ceiling {against[category]:.2f} s" if ceiling and category in against else ""
        print(f"  {category:<50}{seconds:>8.2f} s {100 * seconds / wall:>6.1f}%{note}")
    if ceiling:
        total = sum(ceiling.values())
        print(f"  ceiling of these steps: {total:.2f} s per step = {100 * total / wall:.1f}% of the profiled step")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA),
                    help="folder with alpaca_zh_demo.json, alpaca_en_demo.json")
    ap.add_argument("--dataset", choices=["mixed", "zh", "en"], default="mixed", help="mixed = both files in one set")
    ap.add_argument("--rows", type=int, default=256, help="first N rows of each file")
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=60.0,
                    help="steps continue until every configuration has spent this long in them (per repeat)")
    ap.add_argument("--steps", type=int, help="a fixed number of optimizer steps instead of --seconds")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes running the same steps again")
    ap.add_argument("--horizon", type=int, default=200, help="max_steps of every trainer (the LR schedule's length)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (the recipe default)")
    ap.add_argument("--configs", help="comma-separated; see the module doc (default: baseline-bf16 where bf16 is "
                    "native, loraplex, baseline-fp32)")
    ap.add_argument("--levers", action="store_true", help="also run the lever variants of loraplex, in groups")
    ap.add_argument("--group-size", type=int, default=3, help="configurations alive (and compared) at once")
    ap.add_argument("--loraplex-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="loraplex's model.dtype (auto: bf16 where native)")
    ap.add_argument("--no-ceiling", dest="ceiling", action="store_false", help="skip the ceiling measurement")
    ap.add_argument("--profile-steps", type=int, default=3, help="loraplex steps under torch.profiler (0: none)")
    ap.add_argument("--profile-config", default="loraplex", help="the configuration profiled")
    ap.add_argument("--gpu-steps", type=int, default=20, help="steps per configuration on a GPU (run one by one)")
    ap.add_argument("--device", choices=["cpu", "cuda", "meta"], default="cpu",
                    help="meta: only build the model and print its FLOP parameters")
    ap.add_argument("--model-config", choices=["default", "llama3-8b"], default="default",
                    help="default: SmolLM2-135M-Instruct; llama3-8b: Llama-3-8B shape, random bf16 weights (GPU)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.configs is None:
        from loraplex.device import bf16_supported

        args.configs = ",".join(c for c in CONFIGS if c != "baseline-bf16" or bf16_supported() or args.device == "cuda")
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS + LEVERS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; choose from {CONFIGS + LEVERS}")
    if args.steps is not None and args.steps > args.horizon:
        ap.error("--steps is larger than --horizon")
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
    length = f"{args.steps} steps" if args.steps else f"steps until each configuration has spent {args.seconds:.0f} s"
    print(f"train_speed: {args.dataset}, {args.rows} rows per file, max_seq_length {args.max_seq_length}, "
          f"{args.batch_size} examples per step, {length}, {args.repeats} repeat(s)", flush=True)
    res = run(args)
    print_report(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
