"""QLoRA vs LoRA on the CPU: memory, speed and held-out loss, same data and steps, measured in one run.

    .venv/bin/python benchmarks/qlora_memory.py [DATA_FILE] [--steps 10] [--batch-size 2] [--rows 64]
        [--threads 1] [--configs lora,qlora[,qlora-nogc]] [--repeats 1]

Base: SmolLM2-135M-Instruct (`model: default`). Data: the first --rows rows of DATA_FILE (default
../shared/data/alpaca_en_demo.json beside the checkout), max_seq_length 256, 10% held out. Each
configuration trains one adapter (all linear layers, r 16) for --steps optimizer steps of --batch-size
sequences in a fresh subprocess, so that one's memory cannot leak into the other's numbers:

  lora        full-precision base in the dtype `auto` picks (float32 on a CPU without AVX512-BF16/AMX)
  qlora       the same base in 4 bit (NF4, double quantization, float32 compute), gradient checkpointing on
              (loraplex's default with quantization)
  qlora-nogc  4 bit without gradient checkpointing: separates the 4-bit cost from the recomputation's
              (not run by default: --configs lora,qlora,qlora-nogc)

Reported per configuration: bytes of the base weights in memory (packed 4-bit codes and quantization state
included), peak RSS while loading the base and while training, and the training's peak anonymous RSS
(sampled every 10 ms from /proc/self/status; see RssSampler), tokens per second and per CPU-second
inside optimizer steps (the CPU is shared: CPU time is the steadier comparison), and the held-out loss
before and after training (QLoRA: on the 4-bit base it trained on, and with the adapter loaded onto the
full-precision base). Ratios are against `lora`.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import cpu_line

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
CONFIGS = {
    "lora": {"dtype": "auto"},
    "qlora": {"dtype": "auto", "quantization": "4bit"},
    "qlora-nogc": {"dtype": "auto", "quantization": "4bit", "gradient_checkpointing": False},
}


class RssSampler(threading.Thread):
    """Max resident set size per phase, total and anonymous, read from /proc/self/status (Linux).

    Anonymous memory excludes pages of memory-mapped files: transformers maps a CPU checkpoint's safetensors
    file and uses its pages as the full-precision weights, so those count as file-backed (resident once read).
    """

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.phase, self.peaks, self.anon_peaks = interval, "start", {}, {}
        self._done = threading.Event()

    @staticmethod
    def rss() -> tuple[int, int]:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return tuple(int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "RssAnon"))

    def run(self) -> None:
        while not self._done.is_set():
            rss, anon = self.rss()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            self.anon_peaks[self.phase] = max(self.anon_peaks.get(self.phase, 0), anon)
            time.sleep(self.interval)

    def stop(self) -> tuple[dict, dict]:
        self._done.set()
        self.join()
        return self.peaks, self.anon_peaks


def count_cpu_seconds_in_steps(clock: dict) -> None:
    """Add the process CPU time inside optimizer steps to clock["seconds"]: on a CPU shared with other jobs,
    tokens per CPU-second compares configurations more steadily than tokens per wall-clock second."""
    from transformers import TrainerCallback

    import loraplex.training.runner as run_module

    class CpuClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock["started"] = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            clock["seconds"] += time.process_time() - clock["started"]

    make_trainer = run_module.make_trainer

    def with_clock(*args, **kwargs):
        trainer, stats = make_trainer(*args, **kwargs)
        trainer.add_callback(CpuClock())
        return trainer, stats

    run_module.make_trainer = with_clock


def attention_setting() -> dict:
    """Every configuration uses the masked packed attention, as in the recorded run (benchmarks/README.md),
    so that the configurations compare on one attention path."""
    from loraplex.recipe import TrainSettings

    return {"packed_attention": "masked"} if "packed_attention" in TrainSettings.model_fields else {}


def recipe(config: dict, data: Path, rows: int, steps: int, batch_size: int, out: Path) -> dict:
    return {
        "model": {"path": "default", **config}, "output_dir": str(out), "run_name": "bench",
        "datasets": [{"name": "data", "path": str(data), "max_samples": rows, "max_seq_length": 256,
                      "val_size": 0.1, "target_modules": "all-linear",
                      "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
                      "train": {"max_steps": steps, "lr": 5e-4, "batch_size": batch_size, "warmup_ratio": 0.0,
                                "scheduler": "constant", "logging_steps": 1, "save_steps": 10_000, "seed": 0,
                                **attention_setting()}}],
    }


def worker(name: str, data: Path, rows: int, steps: int, batch_size: int, threads: int) -> dict:
    """One configuration, in this (fresh) process: load, train, measure."""
    import torch

    torch.set_num_threads(threads)
    from loraplex.adapters import load as load_adapters
    from loraplex.evaluation import heldout_metrics
    from loraplex.pipeline import open_recipe
    from loraplex.models import weight_bytes
    from loraplex.quantize import is_quantized
    from loraplex.lm.base import load_base
    from loraplex.training.runner import train_adapter

    clock = {"seconds": 0.0}
    count_cpu_seconds_in_steps(clock)
    sampler = RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        ws = open_recipe(recipe(CONFIGS[name], data, rows, steps, batch_size, Path(tmp)))
        spec = ws.recipe.datasets[0]
        prepared = ws.prepare()[spec.name]
        sampler.phase = "load"
        model, record = load_base(ws)
        base_bytes, quantized = weight_bytes(model), is_quantized(model)
        sampler.phase = "train"
        run_dir = ws.recipe.run_dir()
        pristine = record.get("quantized_base_fingerprint", record["base_fingerprint"])
        meta = train_adapter(model, spec, prepared, ws, run_dir, pristine, resume=False, progress=False,
                             base_record=record)
        peaks, anon_peaks = sampler.stop()
        del model
        on_full = None
        if quantized:  # the QLoRA adapter on the full-precision base: an ordinary LoRA adapter there
            adapter_set = load_adapters(ws.base, {"data": run_dir / "adapters" / "data"}, dtype="auto")
            on_full = heldout_metrics(adapter_set.model, prepared.val)["loss"]
    return {"config": name, "base_weight_bytes": base_bytes, "rss_load": peaks.get("load", 0),
            "rss_train": peaks.get("train", 0), "anon_train": anon_peaks.get("train", 0),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens_per_s": meta["tokens_per_s"], "tokens": meta["tokens_trained"], "steps": meta["steps"],
            "tokens_per_cpu_s": meta["tokens_trained"] / max(clock["seconds"], 1e-9),
            "train_seconds": meta["wall_time_s"], "heldout_base": meta["heldout_loss_base"],
            "heldout": meta["heldout_loss"], "heldout_on_full_base": on_full,
            "quantization": meta.get("quantization"), "dtype": meta["dtype"],
            "gradient_checkpointing": meta["gradient_checkpointing"]}


def run_config(name: str, args) -> dict:
    command = [sys.executable, __file__, str(args.data), "--worker", name, "--rows", str(args.rows),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def combine(runs: list[dict]) -> dict:
    """Repeats of one configuration: the best speed (the least disturbed by other jobs), the highest memory."""
    best = dict(runs[0])
    for key in ("tokens_per_s", "tokens_per_cpu_s"):
        best[key] = max(r[key] for r in runs)
    for key in ("rss_load", "rss_train", "anon_train", "ru_maxrss"):
        best[key] = max(r[key] for r in runs)
    return best


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def table(results: list[dict]) -> str:
    ref = results[0]
    rows = [("", *[r["config"] for r in results]),
            ("base", *[r["quantization"] or r["dtype"] for r in results]),
            ("gradient checkpointing", *["on" if r["gradient_checkpointing"] else "off" for r in results]),
            ("base weights in memory", *[mb(r["base_weight_bytes"]) for r in results]),
            ("  ratio to lora", *[f"{r['base_weight_bytes'] / ref['base_weight_bytes']:.2f}x" for r in results]),
            ("peak RSS, loading", *[mb(r["rss_load"]) for r in results]),
            ("peak RSS, training", *[mb(r["rss_train"]) for r in results]),
            ("  ratio to lora", *[f"{r['rss_train'] / ref['rss_train']:.2f}x" for r in results]),
            ("peak anonymous RSS, training", *[mb(r["anon_train"]) for r in results]),
            ("tokens/s (in steps)", *[f"{r['tokens_per_s']:,.0f}" for r in results]),
            ("  ratio to lora", *[f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" for r in results]),
            ("tokens per CPU-second", *[f"{r['tokens_per_cpu_s']:,.0f}" for r in results]),
            ("  ratio to lora", *[f"{r['tokens_per_cpu_s'] / ref['tokens_per_cpu_s']:.2f}x" for r in results]),
            ("held-out loss, base", *[f"{r['heldout_base']:.4f}" for r in results]),
            ("held-out loss, trained", *[f"{r['heldout']:.4f}" for r in results]),
            ("  adapter on full base", *["-" if r["heldout_on_full_base"] is None
                                         else f"{r['heldout_on_full_base']:.4f}" for r in results])]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="alpaca/messages data file")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (packed into one row)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per configuration")
    parser.add_argument("--configs", default="lora,qlora", help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=1, help="run the configurations this many times, "
                        "interleaved; report each one's best speed and highest memory")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data.resolve(), args.rows, args.steps, args.batch_size,
                                args.threads)))
        return
    if not args.data.is_file():
        raise SystemExit(f"{args.data} does not exist; pass a data file (alpaca or messages rows)")
    names = args.configs.split(",")
    print(cpu_line(), flush=True)
    print(f"SmolLM2-135M-Instruct, {args.data.name}: first {args.rows} rows, max_seq_length 256, all-linear r 16, "
          f"batch {args.batch_size}, {args.steps} steps, {args.threads} thread(s), "
          f"{attention_setting().get('packed_attention', 'default')} packed attention; each configuration in a "
          "fresh process", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:
            started = time.perf_counter()
            runs[name].append(run_config(name, args))
            print(f"  {name} (run {repeat + 1}): {time.perf_counter() - started:.0f}s, "
                  f"{runs[name][-1]['tokens_per_s']:,.0f} tokens/s, {runs[name][-1]['tokens_per_cpu_s']:,.0f} "
                  "tokens per CPU-second", flush=True)
    results = [combine(runs[name]) for name in names]
    print(table(results))
    if "lora" in names and "qlora" in names:
        lora, qlora = results[names.index("lora")], results[names.index("qlora")]
        print(f"QLoRA / LoRA: base weights {qlora['base_weight_bytes'] / lora['base_weight_bytes']:.2f}x, "
              f"peak RSS in training {qlora['rss_train'] / lora['rss_train']:.2f}x, "
              f"tokens/s {qlora['tokens_per_s'] / lora['tokens_per_s']:.2f}x "
              f"(per CPU-second {qlora['tokens_per_cpu_s'] / lora['tokens_per_cpu_s']:.2f}x), "
              f"held-out loss {qlora['heldout']:.4f} vs {lora['heldout']:.4f}")


if __name__ == "__main__":
    main()
