"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is
on sys.path and `from timing import timed` finds it)."""

from __future__ import annotations

import statistics
import time

import jax


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (its result blocked on), after one untimed call (compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
