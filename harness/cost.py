"""What quantizing cost: wall time, peak resident memory, named stages, and the same time as a multiple of one FP
forward pass over the calibration set (measured in the same run, so the multiple means the same on any machine).

The clock belongs to the one quantize entry point (`qvlm_harness.quantize.quantize`): every method's cost is
measured the same way. Methods only mark their phases, ``with stage("gptq"): ...``; outside a recording (a
method called directly, as unit tests do) `stage` does nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field

from qvlm_harness.measure import PeakRSS


@dataclass
class SearchCost:
    """Wall time and peak RSS of a quantization; `stages` in seconds; `fp_pass_s` is one FP forward pass over
    the calibration set on this machine in this run, `fp_passes = seconds / fp_pass_s` (None without one)."""

    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    fp_pass_s: float | None = None

    @property
    def fp_passes(self) -> float | None:
        if not self.fp_pass_s:
            return None
        return self.seconds / self.fp_pass_s

    def to_dict(self) -> dict:
        return asdict(self) | {"fp_passes": self.fp_passes}

    @classmethod
    def from_dict(cls, d: dict | None) -> SearchCost:
        d = d or {}
        return cls(float(d.get("seconds", 0.0)), float(d.get("peak_rss_mb", 0.0)), dict(d.get("stages") or {}),
                   d.get("fp_pass_s"))


class CostRecorder:
    """Times one quantization (wall clock and sampled peak RSS) and collects the stages its method marks."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.cost = SearchCost()
        self._rss = PeakRSS()
        self._t0 = 0.0

    def __enter__(self) -> CostRecorder:
        self._token = _current.set(self)
        self._rss.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self._t0
        self._rss.__exit__(*exc)
        _current.reset(self._token)
        self.cost = SearchCost(seconds, self._rss.peak_mb, {k: round(v, 3) for k, v in self.stages.items()})


_current: ContextVar[CostRecorder | None] = ContextVar("qvlm_harness_cost", default=None)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark a phase of the running quantization (seconds add up when a stage is entered several times)."""
    recorder = _current.get()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if recorder is not None:
            recorder.stages[name] = recorder.stages.get(name, 0.0) + time.perf_counter() - t0
