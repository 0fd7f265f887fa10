"""Uniform (integer-grid) quantization math shared by every method.

Conventions (the packed-kernel converter and all methods rely on them):

* Integer ranges. Symmetric quantization uses the *restricted* signed range ``[-(2^(b-1)-1), 2^(b-1)-1]``
  (int4 -> [-7, 7], int8 -> [-127, 127]) with zero point 0, so that the grid is symmetric around zero and
  negation is exact. Asymmetric quantization uses the unsigned range ``[0, 2^b - 1]`` with an integer zero
  point inside that range.
* Mapping. ``code = clamp(round(x / scale) + zero_point, qmin, qmax)`` with round-half-to-even
  (``torch.round``) and ``x_hat = (code - zero_point) * scale``.
* Asymmetric ranges are always widened to contain 0 (``min <= 0 <= max``) so that zero (padding, ReLU
  outputs, masked tokens) is represented exactly.
* Scales are never 0, NaN or inf: they are floored at `MIN_SCALE` (an all-zero row gets scale `MIN_SCALE`
  and quantizes to exact zeros). Non-finite inputs raise `HarnessError`, because a NaN scale would silently
  turn the whole layer into NaN and the benchmark would report garbage rather than fail.
* Layouts. ``QParams.scale`` / ``zero_point`` broadcast against the tensor being quantized, except for
  group-wise quantization (``QParams.group_size`` set): then they have shape ``[..., K // group_size]`` and
  apply to consecutive blocks of ``group_size`` elements along the last dimension (for a weight
  ``[out, in]``: scales ``[out, in // g]``, codes ``[out, in]``), the layout GPTQ/AWQ-style kernels use.
* All arithmetic is done in float32 whatever the input dtype, then cast back: quantizing in bf16/fp16
  would add rounding error of its own to the scale and the division.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from qvlm_harness.errors import HarnessError

MIN_SCALE = 1e-8
"""Floor for every scale, so all-zero slices still get a finite nonzero scale (and never a denormal one).

Values below ~MIN_SCALE/2 in magnitude therefore quantize to 0, negligible for weights and activations.
A relative floor is unnecessary: a scale is always at least ``max|range| / qmax`` of its own range.
"""

MIN_BITS, MAX_BITS = 2, 8

WeightGranularity = Literal["tensor", "channel", "group"]


def _check_bits(bits: int) -> None:
    if not (MIN_BITS <= int(bits) <= MAX_BITS):
        raise HarnessError(f"integer quantization supports {MIN_BITS}..{MAX_BITS} bits, got {bits}")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)``: restricted signed for symmetric, unsigned for asymmetric."""
    _check_bits(bits)
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def codes_dtype(symmetric: bool) -> torch.dtype:
    """Storage dtype of codes: int8 for symmetric codes, uint8 for asymmetric ones (0..255 at 8 bits)."""
    return torch.int8 if symmetric else torch.uint8


@dataclass
class QParams:
    """Scale and zero point of a uniform quantizer.

    `scale` is float32 and `zero_point` int32 of the same shape. They broadcast against the quantized tensor,
    or, when `group_size` is set, hold one value per block of `group_size` elements along its last dim.
    """

    scale: Tensor
    zero_point: Tensor
    bits: int
    symmetric: bool
    group_size: int | None = None

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]

    def to(self, device: torch.device | str | None = None) -> QParams:
        return QParams(
            self.scale.to(device), self.zero_point.to(device), self.bits, self.symmetric, self.group_size
        )

    def detach(self) -> QParams:
        return QParams(
            self.scale.detach(), self.zero_point.detach(), self.bits, self.symmetric, self.group_size
        )


def _check_finite(x_min: Tensor, x_max: Tensor, what: str) -> None:
    if bool(torch.isfinite(x_min).all()) and bool(torch.isfinite(x_max).all()):
        return
    kind = "NaN" if bool(torch.isnan(x_min).any() or torch.isnan(x_max).any()) else "inf"
    raise HarnessError(
        f"{kind} in {what}: the tensor to quantize contains {kind} (e.g. the calibration activations "
        f"overflowed); check the model dtype (fp16 overflow?) and the input"
    )


def compute_qparams(
    x_min: Tensor | float,
    x_max: Tensor | float,
    bits: int,
    symmetric: bool,
    *,
    what: str = "the values to quantize",
) -> QParams:
    """QParams covering ``[x_min, x_max]`` (broadcastable tensors; the result has their broadcast shape).

    Symmetric: ``scale = max(|x_min|, |x_max|) / qmax``, zero point 0. Asymmetric: the range is widened to
    include 0, ``scale = (max - min) / (2^b - 1)`` and ``zero_point = round(-min / scale)``. Differentiable
    with respect to the range through `scale` (used by learnable-clipping methods); the zero point is not.
    `what` names the tensor in the error raised for NaN/inf ranges.
    """
    qmin, qmax = qrange(bits, symmetric)
    lo = torch.as_tensor(x_min, dtype=torch.float32)
    hi = torch.as_tensor(x_max, dtype=torch.float32)
    _check_finite(lo.detach(), hi.detach(), what)
    if symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = absmax / qmax
    else:
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.clamp(scale, min=MIN_SCALE)
    if symmetric:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zp = torch.round(qmin - lo.detach() / scale.detach())
        zero_point = torch.clamp(zp, qmin, qmax).to(torch.int32)
    return QParams(scale, zero_point, int(bits), bool(symmetric))


def _grouped(x: Tensor, qp: QParams, detach: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Return (x viewed for broadcasting, scale, zero point) honouring the group layout of `qp`."""
    scale, zp = (qp.scale.detach(), qp.zero_point.detach()) if detach else (qp.scale, qp.zero_point)
    if qp.group_size is None:
        return x, scale, zp
    g = qp.group_size
    k = x.shape[-1]
    if k % g:
        raise HarnessError(f"group size {g} does not divide the width {k} of the tensor to quantize")
    return x.reshape(*x.shape[:-1], k // g, g), scale.unsqueeze(-1), zp.unsqueeze(-1)


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def quantize(x: Tensor, qp: QParams) -> Tensor:
    """Integer codes of `x` (same shape as `x`; int8 for symmetric, uint8 for asymmetric QParams)."""
    xv, scale, zp = _grouped(x.detach().float(), qp)
    q = torch.clamp(torch.round(xv / scale) + zp, qp.qmin, qp.qmax)
    return q.reshape(x.shape).to(codes_dtype(qp.symmetric))


def dequantize(codes: Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> Tensor:
    """Float values ``(codes - zero_point) * scale`` in `dtype` (same shape as `codes`)."""
    cv, scale, zp = _grouped(codes.to(torch.float32), qp)
    return ((cv - zp) * scale).reshape(codes.shape).to(dtype)


def fake_quantize(x: Tensor, qp: QParams, ste: bool = False) -> Tensor:
    """Quantize-dequantize `x` with `qp`; the result has `x`'s shape and dtype.

    With ``ste=True`` rounding uses a straight-through estimator: the gradient with respect to `x` is 1 for
    values inside the quantization range and 0 for clipped ones, and gradients also flow into `qp.scale`
    (LSQ/OmniQuant style), which later learnable methods need. Without it the result is detached (no graph).
    """
    if not ste:
        xv, scale, zp = _grouped(x.detach().float(), qp)
        q = torch.clamp(torch.round(xv / scale) + zp, qp.qmin, qp.qmax)
        return ((q - zp) * scale).reshape(x.shape).to(x.dtype)
    xv, scale, zp = _grouped(x.float(), qp, detach=False)
    q = torch.clamp(_round_ste(xv / scale) + zp, qp.qmin, qp.qmax)
    return ((q - zp) * scale).reshape(x.shape).to(x.dtype)


# -- weights -------------------------------------------------------------------------------------------------


def _resolve_granularity(
    group_size: int | None, granularity: WeightGranularity | None
) -> tuple[WeightGranularity, int | None]:
    if granularity is None:
        if group_size is None:
            return "channel", None
        if group_size == -1:
            return "tensor", None
        return "group", group_size
    if granularity == "group":
        if not group_size or group_size <= 0:
            raise HarnessError(f"group-wise quantization needs a positive group size, not {group_size}")
        return "group", group_size
    if granularity in ("tensor", "channel"):
        return granularity, None
    raise HarnessError(f"unknown weight granularity {granularity!r}: use 'tensor', 'channel' or 'group'")


def _weight_view(
    w: Tensor, granularity: WeightGranularity, group_size: int | None, name: str | None
) -> tuple[Tensor, int | tuple[int, ...] | None]:
    """View of the weight and the dims to reduce for one range per channel/group/tensor."""
    if w.dim() != 2:
        raise HarnessError(f"weight quantization expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if granularity == "tensor":
        return w, None
    if granularity == "channel":
        return w, 1
    out, k = w.shape
    assert group_size is not None
    if k % group_size:
        layer = f"layer {name}" if name else "the layer"
        raise HarnessError(
            f"group size {group_size} does not divide the input width {k} of {layer}; "
            f"choose a group size that divides {k} (e.g. 32, 64, 128)"
        )
    return w.reshape(out, k // group_size, group_size), -1


def weight_qparams(
    w: Tensor,
    bits: int,
    symmetric: bool = True,
    group_size: int | None = None,
    *,
    granularity: WeightGranularity | None = None,
    mse: bool = False,
    name: str | None = None,
) -> QParams:
    """QParams for a 2-D weight ``[out, in]``.

    Granularity: per output channel (``group_size=None``; scale ``[out, 1]``), per group of `group_size`
    consecutive input channels (scale ``[out, in // group_size]``, ``QParams.group_size`` set) or per tensor
    (``group_size=-1`` or ``granularity='tensor'``; scale ``[1, 1]``). ``mse=True`` shrinks each range with
    `mse_search_range` (weight clipping) instead of using the plain min/max. `name` is used in errors.
    """
    gran, g = _resolve_granularity(group_size, granularity)
    wf = w.detach().float()
    view, dim = _weight_view(wf, gran, g, name)
    what = f"the weight of layer {name}" if name else "the weight"
    if mse:
        lo, hi = mse_search_range(view, bits, symmetric, dim=dim, what=what)
    elif dim is None:
        lo, hi = view.amin(), view.amax()
    else:
        lo, hi = view.amin(dim=dim, keepdim=True), view.amax(dim=dim, keepdim=True)
    qp = compute_qparams(lo, hi, bits, symmetric, what=what)
    if gran == "tensor":
        return QParams(qp.scale.reshape(1, 1), qp.zero_point.reshape(1, 1), qp.bits, qp.symmetric)
    if gran == "group":
        return QParams(qp.scale.squeeze(-1), qp.zero_point.squeeze(-1), qp.bits, qp.symmetric, g)
    return qp


def quantize_weight(
    w: Tensor,
    bits: int,
    symmetric: bool = True,
    group_size: int | None = None,
    *,
    granularity: WeightGranularity | None = None,
    mse: bool = False,
    name: str | None = None,
) -> tuple[Tensor, QParams]:
    """``(codes [out, in], QParams)`` for a 2-D weight; see `weight_qparams` for the layouts."""
    qp = weight_qparams(w, bits, symmetric, group_size, granularity=granularity, mse=mse, name=name)
    return quantize(w, qp), qp


def fake_quantize_weight(
    w: Tensor,
    bits: int,
    symmetric: bool = True,
    group_size: int | None = None,
    *,
    granularity: WeightGranularity | None = None,
    mse: bool = False,
    name: str | None = None,
) -> Tensor:
    """Quantize-dequantize a 2-D weight; same shape and dtype as `w`."""
    qp = weight_qparams(w, bits, symmetric, group_size, granularity=granularity, mse=mse, name=name)
    return fake_quantize(w, qp)


# -- activations ---------------------------------------------------------------------------------------------


def per_token_qparams(x: Tensor, bits: int, symmetric: bool, *, what: str = "the activations") -> QParams:
    """One range per row of the flattened ``[..., K]`` input: scale shape ``[..., 1]``."""
    xf = x.detach().float()
    return compute_qparams(
        xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True), bits, symmetric, what=what
    )


def quantize_per_token(
    x: Tensor, bits: int, symmetric: bool, *, what: str = "the activations"
) -> tuple[Tensor, QParams]:
    """Dynamic per-token quantization over the last dim: ``(codes like x, QParams with scale [..., 1])``."""
    qp = per_token_qparams(x, bits, symmetric, what=what)
    return quantize(x, qp), qp


def fake_quantize_per_token(
    x: Tensor, bits: int, symmetric: bool, *, ste: bool = False, what: str = "the activations"
) -> Tensor:
    """Quantize-dequantize each row (last dim) with its own dynamic range; same shape/dtype as `x`."""
    return fake_quantize(x, per_token_qparams(x, bits, symmetric, what=what), ste=ste)


def per_tensor_qparams(x: Tensor, bits: int, symmetric: bool, *, what: str = "the activations") -> QParams:
    """One range (scalar scale) for the whole tensor: dynamic per-tensor quantization."""
    xf = x.detach().float()
    return compute_qparams(xf.amin(), xf.amax(), bits, symmetric, what=what)


def fake_quantize_per_tensor(x: Tensor, qp: QParams, ste: bool = False) -> Tensor:
    """Quantize-dequantize with a single (e.g. calibrated, static) range; `qp.scale` must have one element."""
    if qp.scale.numel() != 1 or qp.group_size is not None:
        raise ValueError(f"per-tensor QParams must hold one scale, got shape {tuple(qp.scale.shape)}")
    return fake_quantize(x, qp, ste=ste)


# -- range search --------------------------------------------------------------------------------------------


def mse_search_range(
    x: Tensor,
    bits: int,
    symmetric: bool,
    *,
    dim: int | Sequence[int] | None = None,
    grid: int = 100,
    min_shrink: float = 0.2,
    norm: float = 2.0,
    x_min: Tensor | None = None,
    x_max: Tensor | None = None,
    weights: Tensor | None = None,
    what: str = "the values to quantize",
) -> tuple[Tensor, Tensor]:
    """Clipping range ``(lo, hi)`` minimising the quantization error of `x`.

    Tries `grid` shrink factors from 1.0 down to `min_shrink` applied to the min/max range and keeps, per
    slice, the one with the smallest ``sum |fake_quant(x) - x|^norm`` (norm 2 = MSE). The first candidate is
    the plain min/max range and only strict improvements replace it, so the result is never worse than
    min/max. Outliers are what make a shrunk range win: clipping them costs less than the resolution lost
    for all other values.

    `dim` are the dimension(s) reduced over, as in ``torch.amin`` (``None``: one range for the whole tensor,
    shape ``[]``; otherwise the result keeps those dims with size 1, e.g. ``dim=1`` on ``[out, in]`` gives
    per-channel ranges ``[out, 1]``). `x_min`/`x_max` override the base range and `weights` (broadcast
    against `x`) weight each value's error: a histogram observer passes bin centres as `x`, counts as
    `weights` and the true extremes as the range. Deterministic.
    """
    if grid < 1:
        raise ValueError("grid must be >= 1")
    xf = x.detach().float()
    w = None if weights is None else weights.detach().float()
    reduce_dims = None if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    if reduce_dims is None:
        lo, hi = xf.amin(), xf.amax()
    else:
        lo, hi = xf.amin(dim=reduce_dims, keepdim=True), xf.amax(dim=reduce_dims, keepdim=True)
    if x_min is not None:
        lo = torch.as_tensor(x_min, dtype=torch.float32).detach()
    if x_max is not None:
        hi = torch.as_tensor(x_max, dtype=torch.float32).detach()
    _check_finite(lo, hi, what)

    def error(qp: QParams) -> Tensor:
        diff = (fake_quantize(xf, qp) - xf).abs()
        err = diff.square() if norm == 2.0 else diff.pow(norm)
        if w is not None:
            err = err * w
        return err.sum() if reduce_dims is None else err.sum(dim=reduce_dims, keepdim=True)

    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = error(compute_qparams(lo, hi, bits, symmetric, what=what))
    for alpha in torch.linspace(1.0, min_shrink, grid).tolist()[1:]:
        cand_lo, cand_hi = lo * alpha, hi * alpha
        err = error(compute_qparams(cand_lo, cand_hi, bits, symmetric, what=what))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, cand_lo, best_lo)
        best_hi = torch.where(better, cand_hi, best_hi)
    return best_lo, best_hi


def quant_mse(x: Tensor, qp: QParams) -> float:
    """Mean squared quantization error of `x` under `qp` (a convenience for tests and method diagnostics)."""
    xf = x.detach().float()
    return float((fake_quantize(xf, qp) - xf).square().mean())
