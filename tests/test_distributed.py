"""Training in several processes (torch's launcher, gloo on the CPU): the same adapters as one process with the
same global batches, the main process alone writing, every process checking the base, failures that stop every
process, resume across process counts, and independent jobs sharing one run folder."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from loraplex import train
from loraplex.run import is_complete

ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "amber", "pilot"] * 8]  # 48 rows: 6 full batches of 8
TESTS = Path(__file__).parent
TIMEOUT = 300

# Runs loraplex.train in each launched process; every file loraplex writes is logged with the writer's rank.
LAUNCHED = """
import json, os, sys
import loraplex
from loraplex import atomic
from loraplex.training import runner

rank = os.environ["RANK"]
log = open(os.path.join(sys.argv[2], f"writes-{rank}.txt"), "w")
write_text, make_dir = atomic.atomic_write_text, atomic.atomic_dir

def logged_text(path, text):
    log.write(f"{path}\\n"); log.flush()
    return write_text(path, text)

def logged_dir(path):
    log.write(f"{path}/\\n"); log.flush()
    return make_dir(path)

atomic.atomic_write_text, runner.atomic_dir = logged_text, logged_dir
from loraplex.selection import choose
probe = choose.probe

def counted_probe(*args, **kwargs):  # `target_modules: auto` measures in the main process only
    with open(os.path.join(sys.argv[2], f"probes-{rank}.txt"), "a") as out:
        out.write("probe\\n")
    return probe(*args, **kwargs)

choose.probe = counted_probe
gather_adapter = runner._gather_adapter

def local_numel(p):  # this process's part: a ZeRO-3 partition, an FSDP shard, or the whole tensor
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()

def recorded_gather(trainer, peft_model):  # how much of the model the training process held
    held = sum(local_numel(p) for p in trainer.model.parameters())
    with open(os.path.join(sys.argv[2], f"held-{rank}.txt"), "a") as out:
        out.write(f"{held} {sum(p.numel() for p in peft_model.parameters())}\\n")
    return gather_adapter(trainer, peft_model)

runner._gather_adapter = recorded_gather
if os.environ.get("FAIL_RANK") == rank:
    def fail(*args, **kwargs):
        raise loraplex.errors.LoraplexError(f"a failure made on purpose in process {rank}")
    runner.train_adapter = fail
loraplex.train(json.loads(sys.argv[1]), resume="--resume" in sys.argv, progress=False)
"""


def recipe(tmp: Path, model_dir: Path, name: str = "t", **train_settings) -> dict:
    write_jsonl(tmp / "a.jsonl", ROWS)
    write_jsonl(tmp / "val.jsonl", ROWS[:6])
    settings = {"epochs": 1, "lr": 3e-2, "batch_size": 8, "logging_steps": 1, "save_steps": 100, **train_settings}
    # LoRA dropout draws other random masks in other process counts: off, for an exact comparison
    return {"model": {"path": str(model_dir), "dtype": "float32"}, "output_dir": str(tmp / "runs"), "run_name": name,
            "defaults": {"train": settings, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                         "val_path": str(tmp / "val.jsonl")},
            "datasets": [{"name": "a", "path": str(tmp / "a.jsonl"), "target_modules": ["q_proj"]},
                         {"name": "b", "path": str(tmp / "a.jsonl"), "target_modules": ["v_proj"]}]}


def environment(home: Path, **extra: str) -> dict:
    return {**os.environ, "LORAPLEX_HOME": str(home), "OMP_NUM_THREADS": "1", **extra,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """Bounded in time; on a time-out the launcher and every process it started are killed."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{command[:6]} did not finish in {TIMEOUT} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def launch(raw: dict, log_dir: Path, home: Path, *flags: str, **extra: str) -> subprocess.CompletedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    script = log_dir / "launched.py"
    script.write_text(LAUNCHED, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               json.dumps(raw), str(log_dir), *flags]
    return run(command, environment(home, **extra))


def assert_same_adapters(ours: Path, reference: Path) -> None:
    for name in ("a", "b"):
        got = load_file(ours / name / "adapter_model.safetensors")
        want = load_file(reference / name / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        assert max(float((got[k] - want[k]).abs().max()) for k in got) <= 1e-5
        assert any(float(want[k].abs().max()) > 1e-3 for k in want if "lora_B" in k)  # B moved: a real comparison


def held_fractions(log_dir: Path) -> list[float]:
    """The part of the model each process held while training each adapter (1.0: a whole copy)."""
    lines = [line.split() for rank in ("0", "1") for line in (log_dir / f"held-{rank}.txt").read_text().splitlines()]
    return [int(held) / int(whole) for held, whole in lines]


def two_process_metas_like_one(run_dir: Path, one_process) -> dict[str, dict]:
    """The adapters of a two-process run equal one process's (weights, 6 steps, loss curves within 1e-5); returns
    each adapter's loraplex.json for the caller's own checks."""
    assert_same_adapters(run_dir / "adapters", one_process.run_dir / "adapters")
    metas = {}
    for name, reference in one_process.adapters.items():
        meta = json.loads((run_dir / "adapters" / name / "loraplex.json").read_text())
        assert meta["processes"] == 2 and meta["steps"] == reference["steps"] == 6
        torch.testing.assert_close(torch.tensor([p["loss"] for p in meta["train_loss_curve"]]),
                                   torch.tensor([p["loss"] for p in reference["train_loss_curve"]]), atol=1e-5, rtol=0)
        metas[name] = meta
    return metas


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(tmp / "home"))
        return train(recipe(tmp, tiny_model_dir, "one"), progress=False)


@pytest.mark.slow
def test_two_processes_train_the_adapters_of_one(one_process, tiny_model_dir, tmp_path):
    raw = recipe(tmp_path, tiny_model_dir, "two")
    done = launch(raw, tmp_path / "logs", tmp_path / "home")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(raw["output_dir"]) / "two"
    assert held_fractions(tmp_path / "logs") == [1.0] * 4  # DDP: every process holds the whole model
    for name, meta in two_process_metas_like_one(run_dir, one_process).items():
        assert meta["isolation_checked_in_processes"] == 2
        assert meta["tokens_trained"] == one_process.adapters[name]["tokens_trained"]
    writes = {rank: (tmp_path / "logs" / f"writes-{rank}.txt").read_text().split() for rank in ("0", "1")}
    assert writes["1"] == [], writes["1"]  # the other process wrote nothing
    assert any(line.endswith("/adapters/b/") for line in writes["0"]) and any("run.json" in w for w in writes["0"])


@pytest.mark.slow
def test_fsdp_in_two_processes_trains_the_adapters_of_one_and_decides_auto_once(one_process, tiny_model_dir,
                                                                                tmp_path):
    """FSDP2 (float32, gloo): the adapters and loss curves of one process; `target_modules: auto` probed by the main
    process alone, every process training its choice."""
    raw = recipe(tmp_path, tiny_model_dir, "fsdp")
    raw["distributed"] = {"strategy": "fsdp"}
    raw["datasets"].append({"name": "c", "path": str(tmp_path / "a.jsonl"), "target_modules": "auto",
                            "auto": {"trials": 0, "candidates": ["attention", "mlp"], "probe_batches": 1}})
    done = launch(raw, tmp_path / "logs", tmp_path / "home")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(raw["output_dir"]) / "fsdp"
    assert all(0.45 < part < 0.55 for part in held_fractions(tmp_path / "logs")), held_fractions(tmp_path / "logs")
    for meta in two_process_metas_like_one(run_dir, one_process).values():
        assert meta["reload_max_abs_diff"] < 1e-4
    assert (tmp_path / "logs" / "probes-0.txt").read_text() == "probe\n"
    assert not (tmp_path / "logs" / "probes-1.txt").exists()  # the other process only received the decision
    chosen = json.loads((run_dir / "adapters" / "c" / "loraplex.json").read_text())
    assert is_complete(run_dir / "adapters" / "c") and chosen["selection"]["winner"] in ("attention", "mlp")


@pytest.mark.slow
def test_deepspeed_zero3_in_two_processes_trains_the_adapters_of_one(one_process, tiny_model_dir, tmp_path):
    """DeepSpeed ZeRO-3 (float32, gloo on the CPU): the adapters and loss curves of one process."""
    pytest.importorskip("deepspeed", reason="DeepSpeed ZeRO-3 needs `pip install deepspeed` (loraplex[deepspeed])")
    raw = recipe(tmp_path, tiny_model_dir, "zero3")
    raw["distributed"] = {"strategy": "deepspeed"}
    done = launch(raw, tmp_path / "logs", tmp_path / "home")
    assert done.returncode == 0, done.stderr[-3000:]
    for meta in two_process_metas_like_one(Path(raw["output_dir"]) / "zero3", one_process).values():
        assert meta["reload_max_abs_diff"] < 1e-4
    parts = held_fractions(tmp_path / "logs")  # each process held its partition of base and adapter, about half
    assert len(parts) == 4 and all(0.45 < part < 0.55 for part in parts), parts


@pytest.mark.slow
def test_a_failure_in_one_process_stops_every_process(tiny_model_dir, tmp_path):
    raw = recipe(tmp_path, tiny_model_dir)
    done = launch(raw, tmp_path / "logs", tmp_path / "home", FAIL_RANK="1")  # returns: nothing waits forever
    assert done.returncode != 0
    assert "a failure made on purpose in process 1" in done.stderr
    assert not is_complete(Path(raw["output_dir"]) / "t" / "adapters" / "a")


@pytest.mark.slow
def test_resume_in_two_processes_from_a_one_process_checkpoint(one_process, tiny_model_dir, tmp_path, monkeypatch):
    """Killed after its step-2 checkpoint in one process, finished in two: the adapters of the uninterrupted run."""
    from transformers import TrainerCallback

    from loraplex.training import runner

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    make_trainer = runner.make_trainer

    def interrupted(*args, **kwargs):
        trainer, stats = make_trainer(*args, **kwargs)
        trainer.add_callback(Interrupt())
        return trainer, stats

    raw = recipe(tmp_path, tiny_model_dir, "resumed", save_steps=2)
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(runner, "make_trainer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(raw, progress=False)
    run_dir = Path(raw["output_dir"]) / "resumed"
    assert (run_dir / "checkpoints" / "a" / "checkpoint-2").is_dir() and not is_complete(run_dir / "adapters" / "a")
    done = launch(raw, tmp_path / "logs", tmp_path / "home", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_adapters(run_dir / "adapters", one_process.run_dir / "adapters")
    meta = json.loads((run_dir / "adapters" / "a" / "loraplex.json").read_text())
    assert meta["tokens_trained"] == one_process.adapters["a"]["tokens_trained"]
    assert len(meta["train_loss_curve"]) == 6


@pytest.mark.slow
def test_nproc_with_fsdp_on_the_command_line(tiny_model_dir, tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, tiny_model_dir)), encoding="utf-8")
    command = [sys.executable, "-m", "loraplex", "train", str(path), "--nproc", "2", "--only", "a",
               "distributed.strategy=fsdp"]
    done = run(command, environment(tmp_path / "home"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("adapters in ") == 1  # one table, from the main process
    adapters = tmp_path / "runs" / "t" / "adapters"
    assert is_complete(adapters / "a") and not (adapters / "b").exists()
    bad = run(command + ["run_name=seven", "defaults.train.batch_size=7"], environment(tmp_path / "home"))
    assert bad.returncode == 2
    said = " ".join(bad.stderr.split())  # the console wraps long lines
    assert "datasets[a].train.batch_size: 7 sequences do not split evenly over 2 processes; use a multiple of 2" in said
    assert "training stopped in one of the 2 processes" in said


@pytest.mark.parametrize("strategy, quantization, message", [
    ("deepspeed", None, "distributed.strategy: 'deepspeed' needs DeepSpeed: pip install 'loraplex[deepspeed]'"),
    ("deepspeed", "4bit", "distributed.strategy: 'deepspeed' with model.quantization: 4bit is not supported; use "
                          "strategy 'fsdp'"),
    ("fsdp", "4bit", "distributed.strategy: 'fsdp' with model.quantization: 4bit needs CUDA"),
    ("fsdp", "8bit", "distributed.strategy: 'fsdp' with model.quantization: 8bit cannot shard LLM.int8 weights"),
])
def test_strategies_this_machine_cannot_run_are_refused_before_anything_loads(tiny_model_dir, tmp_path, monkeypatch,
                                                                               strategy, quantization, message):
    from loraplex.errors import LoraplexError

    if strategy == "fsdp" and quantization == "4bit" and torch.cuda.is_available():
        pytest.skip("QLoRA with FSDP runs on a GPU (benchmarks/gpu_check.sh)")
    if "needs DeepSpeed" in message:
        monkeypatch.setitem(sys.modules, "deepspeed", None)  # as where it is not installed
    elif strategy == "deepspeed":
        pytest.importorskip("deepspeed", reason="the quantization check comes after DeepSpeed's presence")
    raw = recipe(tmp_path, tiny_model_dir)
    raw["distributed"] = {"strategy": strategy}
    raw["model"]["quantization"] = quantization
    monkeypatch.setenv("WORLD_SIZE", "2")  # as in a launched process; refused before the process group is joined
    with pytest.raises(LoraplexError, match="^" + re.escape(message)):
        train(raw, progress=False)
    assert not (tmp_path / "runs").exists()


def test_an_accelerate_zero3_launch_needs_the_deepspeed_strategy(tiny_model_dir, tmp_path, monkeypatch):
    from loraplex.errors import LoraplexError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets from a ZeRO-3 config
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(LoraplexError, match="accelerate DeepSpeed ZeRO-3 configuration, but distributed.strategy is "
                                            "'ddp': set distributed.strategy: deepspeed"):
        train(recipe(tmp_path, tiny_model_dir), progress=False)
    assert not (tmp_path / "runs").exists()


def test_the_distributed_block_leaves_the_recipe_fingerprint_alone(tiny_model_dir, tmp_path):
    from loraplex.recipe import load_recipe

    raw = recipe(tmp_path, tiny_model_dir)
    fsdp = {**raw, "distributed": {"strategy": "fsdp"}}
    assert load_recipe(fsdp).distributed.strategy == "fsdp"
    assert load_recipe(fsdp).fingerprint() == load_recipe(raw).fingerprint()


@pytest.mark.slow
def test_two_jobs_train_different_datasets_into_one_run_folder(tiny_model_dir, tmp_path):
    """`--only` spreads a recipe's datasets over independent jobs (e.g. a Slurm array) writing one run folder."""
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, tiny_model_dir)), encoding="utf-8")
    jobs = [subprocess.Popen([sys.executable, "-m", "loraplex", "train", str(path), "--only", name],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=environment(tmp_path / "home"), start_new_session=True)
            for name in ("a", "b")]
    for job in jobs:
        _, err = job.communicate(timeout=TIMEOUT)
        assert job.returncode == 0, err[-3000:]
    run_dir = tmp_path / "runs" / "t"
    assert is_complete(run_dir / "adapters" / "a") and is_complete(run_dir / "adapters" / "b")
    assert json.loads((run_dir / "run.json").read_text())["recipe_fingerprint"]
    assert sorted(p.name for p in run_dir.iterdir()) == [".locks", "adapters", "recipe.resolved.yaml", "run.json"]
