"""What the benchmarks share: the machine line every result starts with (CPU, its features, load), timing and
median helpers, the argparse options for seeds and output, and the demo's data as a benchmark's dataset entry.

The benchmarks run as scripts from this folder (`python benchmarks/<name>.py`), so `from common import ...` finds
this module beside them.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

CPU_FEATURES = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")  # the ones that decide bf16 and matmul speed


def cpu_features() -> list[str]:
    """The CPU_FEATURES this machine's /proc/cpuinfo lists (empty where there is none)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    present = set(flags.split())
    return [feature for feature in CPU_FEATURES if feature in present]


def load_average() -> str:
    """'load 1.52 / 0.98 / 0.61 (1, 5, 15 min)', or 'load n/a' where the OS does not say."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return "load n/a"
    return f"load {one:.2f} / {five:.2f} / {fifteen:.2f} (1, 5, 15 min)"


def cpu_line() -> str:
    """The machine a result was measured on: CPU model, cores, features, native bf16, torch, load."""
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                platform.machine())
    features = cpu_features()
    bf16 = "avx512_bf16" in features or "amx_bf16" in features
    return (f"CPU {name}, {os.cpu_count()} cores, features {' '.join(features) or 'none listed'}, native bf16: "
            f"{'yes' if bf16 else 'no (AVX2 or older)'}; torch {torch.__version__}; {load_average()}")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), its wall-clock seconds)."""
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The median wall-clock seconds of `repeats` calls of fn (the median: one slow call of a shared machine does
    not move it)."""
    return statistics.median(timed(fn)[1] for _ in range(repeats))


def add_seed_options(parser: argparse.ArgumentParser, seeds: int = 3) -> None:
    """--seeds N --first-seed S: the seeds S, S+1, ..., S+N-1 (`seeds(args)`)."""
    parser.add_argument("--seeds", type=int, default=seeds, help="seeds per measurement (first-seed, first-seed + 1, "
                        "...)")
    parser.add_argument("--first-seed", type=int, default=0)


def seeds(args: argparse.Namespace) -> range:
    return range(args.first_seed, args.first_seed + args.seeds)


def add_output_options(parser: argparse.ArgumentParser, work: str) -> None:
    """--work DIR (runs and data, reused by a rerun) and --out FILE (the results as JSON)."""
    parser.add_argument("--work", default=work, help="folder for runs and data (a rerun reuses them)")
    parser.add_argument("--out", default=None, help="write the results here as JSON")


def work_folder(args: argparse.Namespace) -> Path:
    """The --work folder, made; the machine line printed first (every benchmark's output starts with it)."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(cpu_line(), flush=True)
    return work


# the demo data the benchmarks' recorded figures were measured on (320 training rows; `loraplex demo` trains on 160)
BENCHMARK_DEMO_SIZES = {"n_train": 320, "n_val": 24, "n_test": 30}


def demo_entry(work: Path, lang: str, seed: int = 0) -> tuple[dict, dict]:
    """(the demo recipe's defaults at `seed`, a dataset entry for the demo's `lang` data: path, val_path, system),
    the data written once under work/data."""
    from loraplex.demo.command import DEMO_SYSTEM, demo_recipe
    from loraplex.demo.data import demo_file, write_demo_data

    if not (work / "data").is_dir():
        write_demo_data(work / "data", seed=0, **BENCHMARK_DEMO_SIZES)
    entry = {"path": str(work / demo_file(lang, "train")), "val_path": str(work / demo_file(lang, "val")),
             "system": DEMO_SYSTEM}
    return demo_recipe(seed)["defaults"], entry
