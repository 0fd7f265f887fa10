"""Robust timing on a shared, noisy machine: interleaved rounds and medians.

Each round times every candidate once (a burst of calls), in the same order, so slow phases of the machine hit
all candidates alike; the reported figure is the median over rounds of the per-call time. Ratios against a
baseline are computed from medians measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, rounds: int = 15, calls: int = 20,
                     warmup: int = 3, stat: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Seconds per call of each function over interleaved rounds (`stat` of the per-round means: the median by
    default; `min` gives the least-disturbed round, the usual micro-benchmark estimate on a busy machine)."""
    return {k: stat(v) for k, v in round_samples(fns, rounds=rounds, calls=calls, warmup=warmup).items()}


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
