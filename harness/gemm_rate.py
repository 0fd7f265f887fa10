"""The dense GEMM rate this machine reaches now, at a given dtype, thread count and layer shape.

The throughput instrument divides this rate by the FLOPs a sample needs to get the machine's limit in samples/s.
Measuring it in the same process, with the same threads and right next to the evaluation it is compared with,
makes the ratio meaningful on a shared machine: whatever load slows the evaluation also slows these GEMMs.

fp32/fp16/bf16: `torch.mm(x, w.t())`, the layout `nn.Linear` computes (weights stored [N, K]); int8:
`torch._int_mm` (int8 x int8 -> int32, oneDNN/VNNI on CPU), the integer GEMM a packed layer's fused kernel has
to beat. Each shape is warmed up (oneDNN builds a primitive per new shape) and timed as the median of repeats, in
wall time and in process CPU time: the CPU-time rate does not fall when other jobs take the cores away.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


@dataclass(frozen=True, order=True)
class GemmShape:
    """An [M, K] x [K, N] product at one dtype (one of `DTYPES`)."""

    m: int
    k: int
    n: int
    dtype: str

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def _operands(shape: GemmShape) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if shape.dtype == "int8":
        x = torch.randint(-128, 128, (shape.m, shape.k), dtype=torch.int8, generator=gen)
        w = torch.randint(-128, 128, (shape.n, shape.k), dtype=torch.int8, generator=gen)
        return x, w
    dt = DTYPES[shape.dtype]
    return (torch.randn(shape.m, shape.k, generator=gen).to(dt), torch.randn(shape.n, shape.k, generator=gen).to(dt))


def _product(shape: GemmShape):
    x, w = _operands(shape)
    if shape.dtype == "int8":
        return lambda: torch._int_mm(x, w.t())
    return lambda: torch.mm(x, w.t())


@dataclass(frozen=True)
class GemmTiming:
    """Median wall seconds and median process CPU seconds (all threads) of one product."""

    wall_s: float
    cpu_s: float


def time_gemm(shape: GemmShape, *, min_repeats: int = 5, min_seconds: float = 0.02, warmup: int = 2) -> GemmTiming:
    """Median time of one product: `warmup` untimed calls, then at least `min_repeats` timed ones and at least
    `min_seconds` in total (so microsecond shapes are not timed from a single noisy call)."""
    run = _product(shape)
    for _ in range(warmup):
        run()
    walls: list[float] = []
    cpus: list[float] = []
    while len(walls) < min_repeats or sum(walls) < min_seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if len(walls) >= 1000:
            break
    return GemmTiming(statistics.median(walls), statistics.median(cpus))


def time_gemms(shapes: Iterable[GemmShape], **kwargs) -> dict[GemmShape, GemmTiming]:
    """`time_gemm` for every distinct shape, in sorted order (all at the current torch thread count)."""
    return {s: time_gemm(s, **kwargs) for s in sorted(set(shapes))}


def mix_rate(mix: Iterable[tuple[GemmShape, int]], seconds: dict[GemmShape, float]) -> float:
    """FLOP/s of running every (shape, count) of a layer mix once: total FLOPs over total measured time."""
    flops = time_s = 0.0
    for shape, count in mix:
        flops += count * shape.flops
        time_s += count * seconds[shape]
    return flops / time_s if time_s > 0 else 0.0
