"""Activation range observers for static (calibrated) activation quantization.

An observer is fed every calibration batch of a layer's input through `update` and turns what it saw into a
per-tensor `QParams` (scalar scale) with `qparams(bits, symmetric)`; `ChannelMinMaxObserver` gives one range per
input channel (scale ``[in]``) instead. Both observers are streaming: memory is
bounded whatever the number of calibration tokens, and they are deterministic, so the same calibration data
always gives the same ranges.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qvlm_harness.errors import HarnessError
from qvlm_harness.quant.quantizer import QParams, compute_qparams, mse_search_range


class MinMaxObserver:
    """Running global min/max of everything seen; the range covers all values (no clipping)."""

    def __init__(self, name: str | None = None):
        self.name = name
        self.min: Tensor | None = None
        self.max: Tensor | None = None
        self.count = 0

    @property
    def _what(self) -> str:
        base = "the calibration activations"
        return f"{base} of layer {self.name}" if self.name else base

    def update(self, x: Tensor) -> None:
        """Fold a batch (any shape) into the running range; NaN/inf propagate, reported by `qparams`."""
        if x.numel() == 0:
            return
        xf = x.detach().float()
        lo, hi = xf.amin().cpu(), xf.amax().cpu()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.count += x.numel()

    def _require_data(self) -> tuple[Tensor, Tensor]:
        if self.min is None or self.max is None:
            layer = f"layer {self.name}" if self.name else "this layer"
            raise HarnessError(
                f"the calibration run never reached {layer}, so its static activation range is unknown; "
                "check the calibration data or use a dynamic activation spec"
            )
        return self.min, self.max

    def range(self) -> tuple[Tensor, Tensor]:
        """The observed ``(min, max)`` as scalar float32 tensors."""
        return self._require_data()

    def qparams(self, bits: int, symmetric: bool) -> QParams:
        lo, hi = self._require_data()
        return compute_qparams(lo, hi, bits, symmetric, what=self._what)


class MSEObserver(MinMaxObserver):
    """Min/max plus a histogram of every value seen; picks the MSE-optimal clipping range.

    A value sample would be cheaper to write but misses rare outliers, and then the search clips them as if
    they were free (a real failure: one 30.0 among 8k N(0, 1) activations). The histogram counts every
    value: `bins` equal bins over a symmetric range ``[-R, R)`` with R a power of two. When a batch reaches R,
    R doubles and pairs of bins merge, which is exact, so the result does not depend on how the data were
    batched beyond bin resolution (``2R / bins``). The MSE search (`mse_search_range`) evaluates the error on
    the bin centres weighted by their counts, with candidate ranges shrunk from the true extremes; the
    first candidate is the full min/max range, so the result never has a larger (histogram) error than it.
    Memory is constant and everything is deterministic.
    """

    def __init__(self, name: str | None = None, bins: int = 4096, grid: int = 100, min_shrink: float = 0.2):
        super().__init__(name)
        if bins < 4 or bins & (bins - 1):
            raise ValueError("bins must be a power of two >= 4 (keeps binning and merging exact)")
        self.bins = bins
        self.grid = grid
        self.min_shrink = min_shrink
        self.radius: float | None = None
        self.hist = torch.zeros(bins, dtype=torch.float64)

    def _grow(self, absmax: float) -> None:
        assert self.radius is not None
        while absmax >= self.radius:
            merged = self.hist.reshape(self.bins // 2, 2).sum(dim=1)
            self.hist = torch.zeros_like(self.hist)
            self.hist[self.bins // 4 : self.bins // 4 + self.bins // 2] = merged
            self.radius *= 2.0

    def update(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        super().update(x)
        flat = x.detach().float().reshape(-1).cpu()
        absmax = float(flat.abs().max())
        if not math.isfinite(absmax):
            return  # reported (one line) by qparams through the running min/max
        if self.radius is None:
            self.radius = 2.0 ** (math.floor(math.log2(max(absmax, 1e-8))) + 1)
        self._grow(absmax)
        # Bin i covers [-R + i*w, -R + (i+1)*w) with w = 2R/bins a power of two: x / w is exact in float64
        # (torch.histc rounds x + R in float32 and can put values within an ulp of an edge in either bin).
        idx = torch.floor(flat.double() * (self.bins / (2.0 * self.radius))).long() + self.bins // 2
        self.hist += torch.bincount(idx.clamp_(0, self.bins - 1), minlength=self.bins).double()

    def centres(self) -> Tensor:
        """Bin centres of the histogram (float32, ``[bins]``)."""
        assert self.radius is not None
        width = 2.0 * self.radius / self.bins
        return (torch.arange(self.bins, dtype=torch.float64) * width - self.radius + width / 2).float()

    def qparams(self, bits: int, symmetric: bool) -> QParams:
        lo, hi = self._require_data()
        # A NaN/inf range must fail with the one-line message, not inside the search.
        compute_qparams(lo, hi, bits, symmetric, what=self._what)
        occupied = self.hist > 0
        best_lo, best_hi = mse_search_range(
            self.centres()[occupied],
            bits,
            symmetric,
            grid=self.grid,
            min_shrink=self.min_shrink,
            x_min=lo,
            x_max=hi,
            weights=self.hist[occupied],
            what=self._what,
        )
        return compute_qparams(best_lo, best_hi, bits, symmetric, what=self._what)


class ChannelMinMaxObserver(MinMaxObserver):
    """Running min/max of every input channel (the last dim) over all tokens seen: per-input-channel QParams.

    No clipping search: a per-channel range already keeps an outlier channel from stretching the others' step,
    which is what per-tensor ranges need MSE clipping for, and it is what Q-VLM's released code does (a running
    per-channel min/max). Memory is two vectors of the layer's input width whatever the number of tokens.
    """

    def update(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        xf = x.detach().float().reshape(-1, x.shape[-1])
        lo, hi = xf.amin(dim=0).cpu(), xf.amax(dim=0).cpu()
        if self.min is not None and self.min.shape != lo.shape:
            raise HarnessError(f"{self._what}: the input width changed from {self.min.numel()} to {lo.numel()} "
                               "during calibration")
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.count += x.numel()


def make_observer(kind: str, name: str | None = None, granularity: str = "tensor") -> MinMaxObserver:
    """'mse' -> `MSEObserver`, 'minmax' -> `MinMaxObserver`; any kind for ``granularity="channel"`` ->
    `ChannelMinMaxObserver` (per-channel ranges are min/max, see there)."""
    if granularity == "channel":
        return ChannelMinMaxObserver(name)
    key = kind.lower().replace("-", "").replace("_", "")
    if key == "mse":
        return MSEObserver(name)
    if key == "minmax":
        return MinMaxObserver(name)
    raise HarnessError(f"unknown activation observer {kind!r}: use 'mse' or 'minmax'")
