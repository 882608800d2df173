"""Several training processes (`accelerate launch`, `torchrun`, `loraplex train --nproc N`): who writes, and agreement.

Every process runs the same recipe, loads the same base and trains every adapter together with the others
(data parallel: each optimizer step's batch is split over the processes). The main process alone writes files,
prints tables and shows progress; the others wait for it where they would read what it wrote.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from ..device import on_gpu
from ..errors import LoraplexError


def launched() -> bool:
    """True in a process started by a distributed launcher (it sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state():
    """accelerate's process state (the same object the Trainer uses); joins the process group when launched."""
    from accelerate import PartialState

    return PartialState(cpu=not on_gpu())


def world_size() -> int:
    return state().num_processes if launched() else 1


def is_main() -> bool:
    return state().is_main_process if launched() else True


def wait_for_everyone() -> None:
    if launched():
        state().wait_for_everyone()


def gather(value) -> list:
    """`value` of every process, in rank order (a list of one outside a launch)."""
    if not launched():
        return [value]
    state()
    values: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def sum_over_processes(value: int) -> int:
    """The sum of an integer over every process."""
    return sum(gather(value))


def launch(processes: int, command: list[str]) -> int:
    """Run `loraplex <command>` in `processes` processes on this machine (torch's launcher); the exit code.

    On a CPU the cores are shared out (OMP_NUM_THREADS), since every process would otherwise start one thread
    per core and they would slow each other down.
    """
    env = dict(os.environ)
    if not on_gpu():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m", "loraplex", *command]
    code = subprocess.run(launcher, env=env).returncode
    if code:
        raise LoraplexError(f"training stopped in one of the {processes} processes (exit code {code}); its message "
                            "is above. Every process stops with it; fix the cause and run the same command with "
                            "resume=True to continue from the last checkpoint")
    return 0
