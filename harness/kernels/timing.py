"""Robust timing on a shared, noisy machine: interleaved rounds and medians.

Each round times every candidate once (a burst of calls), in the same order, so slow phases of the machine hit
all candidates alike; callers reduce the per-round figures (median, or the least-disturbed round) and compute
ratios against a baseline measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def round_samples(fns: Mapping[str, Callable[[], object]], *, rounds: int = 15, calls: int = 20,
                  warmup: int = 3) -> dict[str, list[float]]:
    """Per-round mean seconds per call of each function, rounds interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls)
    return samples
