"""Where a long job's time goes: named phases timed wherever they run, summed by whoever asked for the figures.

`phase(name)` times its block and adds the seconds to every `collect_phases()` block open around it (in this
thread's context); with none open it only runs the block. Phases may nest: each is counted under its own name, so
a caller subtracts inner phases from outer ones itself.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_collectors: ContextVar[tuple[dict[str, float], ...]] = ContextVar("loraplex_phase_collectors", default=())


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as `name` (seconds added to each open collector, also when the block raises)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        for seconds in _collectors.get():
            seconds[name] = seconds.get(name, 0.0) + elapsed


@contextmanager
def collect_phases() -> Iterator[dict[str, float]]:
    """Within the block, the yielded dict maps each phase name to its total seconds so far."""
    seconds: dict[str, float] = {}
    token = _collectors.set((*_collectors.get(), seconds))
    try:
        yield seconds
    finally:
        _collectors.reset(token)
