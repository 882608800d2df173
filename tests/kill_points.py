"""For scripts that kill a training process at a chosen point: nothing of Python's cleanup runs, as after a SIGKILL
from outside. The scripts run in a subprocess with this folder on PYTHONPATH."""
from __future__ import annotations

import os
import signal
from typing import Callable


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs


def die_after_checkpoint(runner, at_step: Callable[[int], bool]) -> None:
    """Make `runner.make_trainer`'s Trainers die right after saving a checkpoint of a step `at_step` accepts (the
    checkpoint folder is complete there)."""
    from transformers import TrainerCallback

    class KillAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if at_step(state.global_step):
                die()

    make_trainer = runner.make_trainer

    def make_trainer_that_dies(*args, **kwargs):
        trainer, stats = make_trainer(*args, **kwargs)
        trainer.add_callback(KillAfterCheckpoint())
        return trainer, stats

    runner.make_trainer = make_trainer_that_dies
