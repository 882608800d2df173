"""Peak memory per training process: FSDP2 (`distributed.strategy: fsdp`) against DDP, two processes on this machine.

A random Llama whose frozen base dominates (about 70 M parameters, LoRA r=8 on q_proj/v_proj: 0.1% of it) trains
a few steps in two processes (gloo on a CPU, NCCL on GPUs), once per strategy, through loraplex's own pieces: the
recipe's data, `load_base`, the adapter's LoraConfig, `training.distributed.shard` for FSDP and `make_trainer`
(the Trainer wraps the unsharded model in DDP). Each process measures the peak of its memory from the first
training step to the last: on a CPU the resident set (VmHWM, reset after set-up through /proc/self/clear_refs),
on a GPU torch.cuda.max_memory_allocated. The unsharded base a process loaded is freed before that, so the figure
is what training itself holds: with FSDP a process's shards plus the one layer gathered at a time. (`loraplex
train` keeps that unsharded base in CPU memory for its checks; on a GPU only the shards are on the device.)

With `--agreement DTYPE` it measures instead how far two-process adapters (DDP and FSDP, `loraplex train --nproc 2`)
are from one process's, on the tests' tiny Llama with LoRA dropout 0 (float32 is also a test; bfloat16 is not).

    python benchmarks/fsdp_memory.py                    # prints each process's peak and the ratio FSDP/DDP
    python benchmarks/fsdp_memory.py --layers 2 --steps 1   # a quick run
    python benchmarks/fsdp_memory.py --agreement bfloat16   # max |Δ| of the adapters and loss curves
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
    """One launched process: the adapter's model (sharded for FSDP), the unsharded base freed, then training."""
    import ctypes

    from peft import get_peft_model

    from loraplex.lm.base import load_base
    from loraplex.lm.settings import lora_config
    from loraplex.pipeline import open_recipe
    from loraplex.training.distributed import is_main, shard, sharded
    from loraplex.training.trainer import make_trainer

    ws = open_recipe(recipe(folder, strategy, steps))
    spec = ws.recipe.datasets[0]
    data = ws.prepare()[spec.name]
    base, _ = load_base(ws, on_device=not sharded(strategy))
    model = get_peft_model(base, lora_config(spec))
    if sharded(strategy):
        model = shard(model)
        del base
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed pages back to the system before the peak is reset
    trainer, _ = make_trainer(model, spec, data, folder / "checkpoints" / strategy, progress=False)
    peak_reset()
    before = peak_mb()  # what the process holds when training starts
    trainer.train()
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    result = {"strategy": strategy, "rank": int(os.environ["RANK"]), "start_mb": before, "peak_mb": peak_mb(),
              "losses": losses, "main": is_main()}
    print("RESULT " + json.dumps(result), flush=True)


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
    runs = {"one": [], "ddp": ["--nproc", "2"], "fsdp": ["--nproc", "2", "distributed.strategy=fsdp"]}
    for name, flags in runs.items():
        command = [sys.executable, "-m", "loraplex", "train", str(path), f"run_name={name}", *flags]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    adapters = {name: folder / "runs" / name / "adapters" / "words" for name in runs}
    want = load_file(adapters["one"] / "adapter_model.safetensors")
    curve = [e["loss"] for e in json.loads((adapters["one"] / "loraplex.json").read_text())["train_loss_curve"]]
    print(f"{dtype}, {len(curve)} steps, largest LoRA weight {max(float(v.abs().max()) for v in want.values()):.4f}")
    for name in ("ddp", "fsdp"):
        got = load_file(adapters[name] / "adapter_model.safetensors")
        theirs = [e["loss"] for e in json.loads((adapters[name] / "loraplex.json").read_text())["train_loss_curve"]]
        weights = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
        losses = max(abs(a - b) for a, b in zip(theirs, curve))
        print(f"{name} against one process: adapter max |Δ| {weights:.2e}, loss curve max |Δ| {losses:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", type=Path)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--agreement", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.strategy, args.steps)
    print(cpu_line())
    if args.agreement:
        with tempfile.TemporaryDirectory() as tmp:
            return agreement(Path(tmp), args.agreement)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_base(folder / "base", args.layers)
        results = {strategy: run(strategy, folder, args.steps) for strategy in ("ddp", "fsdp")}
    for strategy, rows in results.items():
        for row in rows:
            print(f"{strategy:5} process {row['rank']}: {row['start_mb']:,.0f} MB at the first step, peak "
                  f"{row['peak_mb']:,.0f} MB in training, "
                  f"losses {row['losses']}")
    ratio = max(r["peak_mb"] for r in results["fsdp"]) / max(r["peak_mb"] for r in results["ddp"])
    same = results["fsdp"][0]["losses"] == results["ddp"][0]["losses"]
    print(f"FSDP/DDP peak memory per process: {ratio:.2f}x (the larger process of each); "
          f"loss curves {'equal' if same else 'differ'}")


if __name__ == "__main__":
    main()
