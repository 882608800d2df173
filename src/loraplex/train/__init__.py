"""Per-dataset adapter training (`loraplex.train.run`); batches and loss in `loraplex.train.batching`."""
from __future__ import annotations


def __getattr__(name: str):
    # run.py imports evaluate.py, which imports batching.py from this package: import run lazily
    if name in ("RunResult", "is_complete", "train"):
        from . import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["RunResult", "is_complete", "train"]
