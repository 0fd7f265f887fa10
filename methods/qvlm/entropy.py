"""Activation entropy: the paper's proxy for cross-layer dependency.

Three estimators:

* `histogram_entropy`: Shannon entropy (bits) of the histogram of a unit's input activations over the whole
  calibration set: `bins` equal bins spanning the observed ``[min, max]`` of the valid (unpadded) tokens. Exact
  and independent of how the data were batched. `histogram_entropy_per_sample` gives one value per sample with
  the same global bins (the dependency analysis plots one point per multimodal sample).
* `official_entropy`: the released code's proxy (`cal_entropy` in QVLM's quant_modules.py): per sample,
  L2-normalise ``|x|`` over the tokens of each channel, take ``-sum a log(a + 1e-7)`` over tokens, average over
  channels. Offered as an option because the released code uses it; it measures how spread each channel's
  magnitude is over tokens, not the value distribution.
* `soft_histogram_entropy`: a differentiable estimate (linear-interpolation soft binning on fixed bins) used by
  the visual-encoder optimisation, whose loss must be differentiated through the activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _valid_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """The valid token rows ``[n, d]`` of a ``[..., T, d]`` activation (mask ``[..., T]``, True = valid)."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if mask is None:
        return flat
    return flat[mask.reshape(-1).to(torch.bool)]


def _range(chunks: Sequence[Tensor], masks: Sequence[Tensor | None]) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for x, m in zip(chunks, masks, strict=True):
        v = _valid_rows(x, m)
        if v.numel():
            lo = min(lo, float(v.min()))
            hi = max(hi, float(v.max()))
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ValueError("no finite activations to measure (empty input or NaN/inf activations)")
    return lo, hi


def _counts(values: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    """Histogram counts (float64, on the CPU: `bins` numbers, whatever device `values` is on) of `values` on `bins`
    equal bins over [lo, hi] (last bin closed), as numpy.histogram counts them."""
    v = values.reshape(-1).double()
    if hi <= lo:  # a constant tensor: everything in one bin
        return torch.bincount(torch.zeros(v.numel(), dtype=torch.long), minlength=bins).double()
    idx = torch.floor((v - lo) * (bins / (hi - lo))).long().clamp_(0, bins - 1)
    return torch.bincount(idx, minlength=bins).double().cpu()


def entropy_of_counts(counts: Tensor) -> float:
    """Shannon entropy in bits of a histogram (zero bins contribute nothing)."""
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * torch.log2(p)).sum())


def histogram_entropy(chunks: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None, bins: int = 256) -> float:
    """Entropy (bits) of the `bins`-bin histogram over [min, max] of all valid values in `chunks`."""
    masks = list(masks) if masks is not None else [None] * len(chunks)
    lo, hi = _range(chunks, masks)
    counts = torch.zeros(bins, dtype=torch.float64)
    for x, m in zip(chunks, masks, strict=True):
        counts += _counts(_valid_rows(x, m), lo, hi, bins)
    return entropy_of_counts(counts)


def histogram_entropy_per_sample(chunks: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None,
                                 bins: int = 256) -> list[float]:
    """One entropy per sample (row of the leading batch dim of each chunk), all on the global bins."""
    masks = list(masks) if masks is not None else [None] * len(chunks)
    lo, hi = _range(chunks, masks)
    out: list[float] = []
    for x, m in zip(chunks, masks, strict=True):
        for i in range(x.shape[0]):
            out.append(entropy_of_counts(_counts(_valid_rows(x[i], None if m is None else m[i]), lo, hi, bins)))
    return out


def official_entropy_sample(x: Tensor) -> float:
    """The released code's proxy for one sample ``[T, d]`` (valid tokens only)."""
    a = torch.nn.functional.normalize(x.detach().float().abs(), dim=0)
    return float((-(a * torch.log(a + 1e-7)).sum(dim=0)).mean())


def official_entropy_per_sample(chunks: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None) -> list[float]:
    masks = list(masks) if masks is not None else [None] * len(chunks)
    out: list[float] = []
    for x, m in zip(chunks, masks, strict=True):
        for i in range(x.shape[0]):
            out.append(official_entropy_sample(_valid_rows(x[i], None if m is None else m[i])))
    return out


def official_entropy(chunks: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None) -> float:
    """Mean over samples of `official_entropy_sample`."""
    vals = official_entropy_per_sample(chunks, masks)
    return float(sum(vals) / len(vals)) if vals else 0.0


def unit_entropy(chunks: Sequence[Tensor], masks: Sequence[Tensor | None] | None, kind: str, bins: int) -> float:
    if kind == "hist":
        return histogram_entropy(chunks, masks, bins)
    if kind == "official":
        return official_entropy(chunks, masks)
    raise ValueError(f"unknown entropy estimator {kind!r}")


def unit_entropy_per_sample(chunks: Sequence[Tensor], masks: Sequence[Tensor | None] | None, kind: str,
                            bins: int) -> list[float]:
    if kind == "hist":
        return histogram_entropy_per_sample(chunks, masks, bins)
    if kind == "official":
        return official_entropy_per_sample(chunks, masks)
    raise ValueError(f"unknown entropy estimator {kind!r}")


def soft_histogram_entropy(x: Tensor, lo: float, hi: float, bins: int = 64) -> Tensor:
    """Differentiable entropy (bits) of `x` on `bins` fixed bins over [lo, hi].

    Each value spreads its unit mass over the two nearest bin centres, linearly in its distance to them (values
    beyond the range go to the edge bin), so the histogram, and the entropy, are piecewise-linear in the values.
    """
    v = x.reshape(-1).float()
    width = (hi - lo) / bins if hi > lo else 1.0
    u = ((v - lo) / width - 0.5).clamp(0.0, bins - 1.0)
    left = torch.floor(u.detach()).clamp(max=bins - 2).long()
    frac = u - left.to(u.dtype)
    counts = torch.zeros(bins, dtype=v.dtype, device=v.device)
    counts = counts.index_add(0, left, 1.0 - frac).index_add(0, left + 1, frac)
    p = counts / v.numel()
    return -(p * torch.log2(p.clamp(min=1e-12))).sum()
