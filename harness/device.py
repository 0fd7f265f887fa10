"""Device helpers that make CPU and CUDA measurements mean the same thing: synchronise, time, peak memory, placement.

CUDA kernels run asynchronously: a host clock read right after a launch measures the launch, not the work. So
every timing here synchronises the device first (`sync`), and `timer` on CUDA records a pair of
``torch.cuda.Event(enable_timing=True)`` on the current stream and waits for the end event before reading
``start.elapsed_time(end)`` (milliseconds of device time between the two). On the CPU both are a no-op and
`time.perf_counter`, so the CPU paths are unchanged.

Peak memory on CUDA is torch's caching-allocator high-water mark, ``torch.cuda.max_memory_allocated``, reset
per measured region (`PeakDeviceMemory`); on the CPU there is none here (the RSS sampler of
`qvlm_harness.measure` covers host memory), so the helpers return None rather than a made-up figure.

`module_device` / `place_like` keep a swapped-in module on the device of the module it replaces: methods build
quantized layers from codes that some searches compute on the CPU (GPTQ's numpy loop, NormalFloat's block
statistics), and a layer left there would fail the next forward on a CUDA model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from qvlm_harness.kernels.gemm import CUDA_RULE, padded_shape


def as_device(device: torch.device | str | None) -> torch.device:
    """`device` as a torch.device (None: the CPU)."""
    return torch.device("cpu") if device is None else torch.device(device)


def is_cuda(device: torch.device | str | None) -> bool:
    return as_device(device).type == "cuda"


def sync(device: torch.device | str | None) -> None:
    """Wait until every kernel queued on `device` has finished (no-op on the CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize(as_device(device))


@dataclass
class Elapsed:
    """Seconds measured by `timer` (set when its block exits)."""

    seconds: float = 0.0
    clock: str = "perf_counter"


@contextmanager
def timer(device: torch.device | str | None) -> Iterator[Elapsed]:
    """Time the block: CUDA events on the current stream (synchronised) on CUDA, `time.perf_counter` elsewhere.

    Prior queued work is drained first (`sync`), so it is not charged to the block."""
    out = Elapsed()
    if is_cuda(device):
        dev = as_device(device)
        sync(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield out
        finally:
            end.record()
            end.synchronize()
            out.seconds = start.elapsed_time(end) / 1000.0
            out.clock = "cuda events"
        return
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out.seconds = time.perf_counter() - t0


def reset_peak_memory(device: torch.device | str | None) -> None:
    """Start a new CUDA high-water mark (no-op on the CPU)."""
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(as_device(device))


def peak_memory(device: torch.device | str | None) -> int | None:
    """Bytes: the CUDA allocator's high-water mark since the last reset; None on the CPU (see the module doc)."""
    if not is_cuda(device):
        return None
    return int(torch.cuda.max_memory_allocated(as_device(device)))


def allocated_memory(device: torch.device | str | None) -> int | None:
    """Bytes the CUDA allocator holds for live tensors now; None on the CPU."""
    if not is_cuda(device):
        return None
    return int(torch.cuda.memory_allocated(as_device(device)))


class PeakDeviceMemory:
    """Context manager: the CUDA peak inside the block (`.peak_mb`) and what was live at its start
    (`.start_mb`); both None on the CPU."""

    def __init__(self, device: torch.device | str | None):
        self.device = device
        self.peak_mb: float | None = None
        self.start_mb: float | None = None

    def __enter__(self) -> PeakDeviceMemory:
        sync(self.device)
        reset_peak_memory(self.device)
        start = allocated_memory(self.device)
        self.start_mb = None if start is None else start / 2**20
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        peak = peak_memory(self.device)
        self.peak_mb = None if peak is None else peak / 2**20


# -- torch._int_mm on CUDA ------------------------------------------------------------------------------------------
def int_mm_shape_ok(m: int, k: int, n: int) -> bool:
    """Whether ``[m, k] @ [k, n]`` meets cuBLASLt's int8 GEMM rules as `torch._int_mm` checks them on CUDA:
    ``m > 16`` and ``k``, ``n`` multiples of 8 (the CPU has no rule)."""
    return padded_shape(m, k, n, CUDA_RULE) == (m, k, n)


def int_mm_padded_shape(m: int, k: int, n: int) -> tuple[int, int, int]:
    """The smallest shape at or above ``(m, k, n)`` that `int_mm_shape_ok` accepts: zero rows and columns are
    added (they add nothing to the integer sums) and the result is sliced back."""
    return padded_shape(m, k, n, CUDA_RULE)


# -- placement ------------------------------------------------------------------------------------------------------
def module_device(module: nn.Module | None) -> torch.device | None:
    """The device of the first parameter or buffer of `module` (None if it holds no tensor)."""
    if module is None:
        return None
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def off_device(module: nn.Module, device: torch.device) -> list[str]:
    """Names of the parameters and buffers of `module` that are not on `device`."""
    want = as_device(device)
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()]
            if t.device.type != want.type or (want.index is not None and t.device.index != want.index)]


def place_like(new: nn.Module, old: nn.Module | None) -> nn.Module:
    """`new` moved (in place) to the device `old` lives on, when that is a real device and some tensor of `new`
    is elsewhere; otherwise untouched (so CPU models are never copied)."""
    target = module_device(old)
    if target is None or target.type == "meta":
        return new
    if off_device(new, target):
        new.to(target)
    return new
