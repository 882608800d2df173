"""Peak memory per training process: FSDP2 (`distributed.strategy: fsdp`) and DeepSpeed ZeRO-3 (`deepspeed`) against
DDP, two processes on this machine.

A random Llama whose frozen base dominates (about 70 M parameters, LoRA r=8 on q_proj/v_proj: 0.1% of it) trains
a few steps in two processes (gloo on a CPU, NCCL on GPUs), once per strategy, through loraplex's own pieces: the
recipe's data, `load_base`, the adapter's LoraConfig, `training.distributed.shard` for FSDP, `make_trainer` (the
Trainer wraps the unsharded model in DDP, or hands it to DeepSpeed's engine, which partitions it when training
starts). Each process measures the peak of its memory over the training steps after the first (by then every
strategy holds what it keeps while training): on a CPU the resident set (VmHWM, reset through
/proc/self/clear_refs), on a GPU torch.cuda.max_memory_allocated. The unsharded base a process loaded is freed
before that, so the figure is what training itself holds: with FSDP or ZeRO-3 a process's shards plus the weights
gathered at a time. (`loraplex train` keeps that unsharded base in CPU memory for its checks; on a GPU only the
shards are on the device.) Needs `--steps` of 2 or more.

With `--agreement DTYPE` it measures instead how far two-process adapters (DDP, FSDP and ZeRO-3, `loraplex train
--nproc 2`) are from one process's, on the tests' tiny Llama with LoRA dropout 0 (float32 is also a test; bfloat16
is not).

    python benchmarks/fsdp_memory.py                    # each process's peak and the ratios FSDP/DDP, ZeRO-3/DDP
    python benchmarks/fsdp_memory.py --layers 2 --steps 2   # a quick run
    python benchmarks/fsdp_memory.py --agreement bfloat16   # max |Δ| of the adapters and loss curves
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("ddp", "fsdp", "deepspeed") if importlib.util.find_spec("deepspeed") else ("ddp", "fsdp")
ROWS = [{"instruction": f"Write the word {w} three times.", "input": "", "output": f"{w} {w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "amber", "pilot", "maple", "tiger"] * 4]


def make_base(folder: Path, layers: int) -> None:
    """A random Llama (hidden 1024, MLP 2816, `layers` decoder layers) with the tests' byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_byte_tokenizer

    tokenizer = make_byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                         max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def recipe(folder: Path, strategy: str, steps: int) -> dict:
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return {"model": {"path": str(folder / "base"), "dtype": "float32"}, "output_dir": str(folder / "runs"),
            "distributed": {"strategy": strategy},
            "datasets": [{"name": "words", "path": str(data), "target_modules": ["q_proj", "v_proj"],
                          "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                          "train": {"batch_size": 4, "max_steps": steps, "lr": 1e-3, "logging_steps": 1,
                                    "save_steps": 1000}}]}


def peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the resident set's high-water mark starts again from now


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def worker(folder: Path, strategy: str, steps: int) -> None:
    """One launched process: the adapter's model (sharded for FSDP, partitioned by DeepSpeed's engine at its first
    step for ZeRO-3), the unsharded base freed, then training; the peak counts from the end of the first step."""
    import ctypes

    from peft import get_peft_model
    from transformers import TrainerCallback, set_seed

    from loraplex.lm.base import load_base
    from loraplex.lm.settings import lora_config
    from loraplex.pipeline import open_recipe
    from loraplex.training.distributed import deepspeed_config, is_main, shard, sharded, zero3
    from loraplex.training.trainer import make_trainer

    ws = open_recipe(recipe(folder, strategy, steps))
    spec = ws.recipe.datasets[0]
    data = ws.prepare()[spec.name]
    base, _ = load_base(ws, on_device=not (sharded(strategy) or zero3(strategy)))
    set_seed(spec.train.seed)  # the same LoRA init in every process and every run, as `loraplex train` does
    model = get_peft_model(base, lora_config(spec))
    del base
    if sharded(strategy):
        model = shard(model)
    trainer, _ = make_trainer(model, spec, data, folder / "checkpoints" / strategy, progress=False,
                              deepspeed=deepspeed_config(model) if zero3(strategy) else None)
    del model
    start: list[float] = []

    class AfterTheFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                gc.collect()
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed pages back to the system before the peak is reset
                peak_reset()
                start.append(peak_mb())  # what the process holds once training is under way

    trainer.add_callback(AfterTheFirstStep())
    trainer.train()
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    result = {"strategy": strategy, "rank": int(os.environ["RANK"]), "start_mb": start[0], "peak_mb": peak_mb(),
              "losses": losses, "main": is_main()}
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")  # one write: the two processes share the pipe
    sys.stdout.flush()


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    features = sorted({f for f in ("avx2", "avx512_bf16", "amx") if f in info})
    return f"{os.cpu_count()} cores, {model}, {' '.join(features) or 'no avx2'}"


def run(strategy: str, folder: Path, steps: int) -> list[dict]:
    # glibc's malloc otherwise raises its mmap threshold after the first large free and then keeps freed buffers
    # (FSDP's gathered layers) in its heap: the resident set would count memory no tensor holds any more
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAPLEX_HOME": str(folder / "home"),
           "MALLOC_MMAP_THRESHOLD_": str(2**20),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", str(folder), "--strategy", strategy, "--steps", str(steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{strategy} failed:\n{done.stderr[-3000:]}")
    return sorted((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")),
                  key=lambda r: r["rank"])


def agreement(folder: Path, dtype: str) -> None:
    """Adapters and loss curves of `loraplex train --nproc 2` (ddp, fsdp) against one process, in `dtype`."""
    import yaml
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_model_dir

    make_tiny_model_dir(folder / "base")
    raw = recipe(folder, "ddp", 6)
    raw["model"]["dtype"] = dtype
    # every row trains (the held-out rows are the same file): 4 full batches, none topped up in two processes
    raw["datasets"][0].update(target_modules=["q_proj"], lora={"r": 4, "alpha": 8, "dropout": 0.0},
                              val_path=raw["datasets"][0]["path"])
    raw["datasets"][0]["train"].update(batch_size=8, lr=3e-2, max_steps=None, epochs=1)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAPLEX_HOME": str(folder / "home"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    runs = {"one": [], "ddp": ["--nproc", "2"], "fsdp": ["--nproc", "2", "distributed.strategy=fsdp"],
            "deepspeed": ["--nproc", "2", "distributed.strategy=deepspeed"]}
    runs = {name: flags for name, flags in runs.items() if name in ("one", *STRATEGIES)}
    for name, flags in runs.items():
        command = [sys.executable, "-m", "loraplex", "train", str(path), f"run_name={name}", *flags]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    adapters = {name: folder / "runs" / name / "adapters" / "words" for name in runs}
    want = load_file(adapters["one"] / "adapter_model.safetensors")
    curve = [e["loss"] for e in json.loads((adapters["one"] / "loraplex.json").read_text())["train_loss_curve"]]
    print(f"{dtype}, {len(curve)} steps, largest LoRA weight {max(float(v.abs().max()) for v in want.values()):.4f}")
    for name in STRATEGIES:
        got = load_file(adapters[name] / "adapter_model.safetensors")
        theirs = [e["loss"] for e in json.loads((adapters[name] / "loraplex.json").read_text())["train_loss_curve"]]
        weights = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
        losses = max(abs(a - b) for a, b in zip(theirs, curve))
        print(f"{name} against one process: adapter max |Δ| {weights:.2e}, loss curve max |Δ| {losses:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="2 or more: the peak counts from the second step")
    parser.add_argument("--worker", type=Path)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--agreement", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.strategy, args.steps)
    if args.steps < 2:
        parser.error("--steps: 2 or more (the peak is measured over the steps after the first)")
    print(cpu_line())
    if args.agreement:
        with tempfile.TemporaryDirectory() as tmp:
            return agreement(Path(tmp), args.agreement)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_base(folder / "base", args.layers)
        results = {strategy: run(strategy, folder, args.steps) for strategy in STRATEGIES}
    for strategy, rows in results.items():
        for row in rows:
            print(f"{strategy:9} process {row['rank']}: {row['start_mb']:,.0f} MB after the first step, peak "
                  f"{row['peak_mb']:,.0f} MB in the steps after it, losses {row['losses']}")
    for strategy, label in (("fsdp", "FSDP"), ("deepspeed", "ZeRO-3")):
        if strategy not in results:
            print(f"{label}: not run (pip install 'loraplex[deepspeed]')")
            continue
        ratio = max(r["peak_mb"] for r in results[strategy]) / max(r["peak_mb"] for r in results["ddp"])
        same = results[strategy][0]["losses"] == results["ddp"][0]["losses"]
        print(f"{label}/DDP peak memory per process: {ratio:.2f}x (the larger process of each); "
              f"loss curves {'equal' if same else 'differ'}")


if __name__ == "__main__":
    main()
