"""GPU check, two-GPU part: `distributed.strategy: fsdp` (FSDP2) with LoRA and with QLoRA, and `deepspeed`
(ZeRO-3), on two CUDA GPUs.

Runs only where at least two GPUs exist (otherwise it prints one SKIP line). Checks:

  fsdp memory     benchmarks/fsdp_memory.py on the GPUs: the peak of torch.cuda.max_memory_allocated per
                  process while training, FSDP against DDP on the same model: FSDP must be lower, with the same
                  loss curve
  zero3 memory    the same run, ZeRO-3 against DDP
  fsdp agreement  `loraplex train --nproc 2` with DDP, FSDP and ZeRO-3 against one process, bfloat16 (the tests'
  zero3 agreement tiny Llama): adapters within 1e-3 of one process's
  qlora fsdp      `loraplex train --nproc 2 distributed.strategy=fsdp model.quantization=4bit` (4-bit codes stored
                  in bfloat16, `bnb_4bit_quant_storage`) trains and saves the adapter

    bash benchmarks/gpu_check.sh          # runs this first, then the one-GPU checks
    python benchmarks/gpu_check_fsdp.py   # this part alone

The last line is `gpu_check_fsdp: N passed, M failed` (or the SKIP line); the exit status is 1 if a check failed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "fsdp_memory.py"


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    print(done.stdout, end="")
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
    return done


def check(name: str, passed: bool, detail: str) -> bool:
    print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")
    return passed


def judged(done: subprocess.CompletedProcess, checks: list[tuple[str, str, Callable]]) -> list[bool]:
    """Each (name, pattern, judge) of `checks`: `judge(match)` -> (passed, detail) on the benchmark's output."""
    results = []
    for name, pattern, judge in checks:
        found = re.search(pattern, done.stdout)
        if done.returncode or not found:  # ZeRO-3 prints no result where DeepSpeed is not installed
            results.append(check(name, False, f"no result in the benchmark's output (exit {done.returncode})"))
        else:
            results.append(check(name, *judge(found)))
    return results


def memory_checks(env: dict) -> list[bool]:
    def ratio(label: str) -> Callable:
        return lambda m: (float(m[1]) < 1 and m[2] == "equal", f"{label}/DDP {float(m[1]):.2f}x, loss curves {m[2]}")

    return judged(run([sys.executable, str(BENCH)], env),
                  [(f"{name} memory", label + r"/DDP peak memory per process: ([\d.]+)x .*loss curves (\w+)",
                    ratio(label)) for name, label in (("fsdp", "FSDP"), ("zero3", "ZeRO-3"))])


def agreement_checks(env: dict) -> list[bool]:
    def within(m) -> tuple[bool, str]:
        return float(m[1]) <= 1e-3, f"adapter max |Δ| {m[1]}"

    return judged(run([sys.executable, str(BENCH), "--agreement", "bfloat16"], env),
                  [(f"{name} agreement", printed + r" against one process: adapter max \|Δ\| ([\d.e+-]+)", within)
                   for name, printed in (("fsdp", "fsdp"), ("zero3", "deepspeed"))])


def qlora_check(env: dict, work: Path) -> bool:
    import yaml

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_model_dir

    make_tiny_model_dir(work / "base")
    rows = [{"instruction": f"Repeat {w}.", "input": "", "output": f"{w} {w}"} for w in ["apple", "river"] * 16]
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = {"model": {"path": str(work / "base"), "dtype": "bfloat16", "quantization": "4bit"},
              "output_dir": str(work / "runs"), "run_name": "qlora",
              "datasets": [{"name": "a", "path": str(work / "rows.jsonl"), "target_modules": ["q_proj", "v_proj"],
                            "train": {"batch_size": 4, "max_steps": 4, "lr": 1e-2, "logging_steps": 1}}]}
    (work / "qlora.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    done = run([sys.executable, "-m", "loraplex", "train", str(work / "qlora.yaml"), "--nproc", "2",
                "distributed.strategy=fsdp"], env)
    meta = work / "runs" / "qlora" / "adapters" / "a" / "loraplex.json"
    if done.returncode or not meta.is_file():
        return check("qlora fsdp", False, f"loraplex train failed (exit {done.returncode})")
    curve = [p["loss"] for p in json.loads(meta.read_text())["train_loss_curve"]]
    return check("qlora fsdp", curve[-1] < curve[0], f"loss {curve[0]:.4f} -> {curve[-1]:.4f}")


def main() -> int:
    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"SKIP  fsdp: {gpus} CUDA GPU(s) here; the FSDP checks need two")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LORAPLEX_HOME": os.environ.get("LORAPLEX_HOME", str(Path(tmp) / "home")),
               "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0,1"),
               "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        results = [*memory_checks(env), *agreement_checks(env), qlora_check(env, Path(tmp))]
    print(f"gpu_check_fsdp: {sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
