"""Activation quantization on the fly, producing centred int8 codes for the integer GEMM.

The arithmetic is exactly that of `qvlm_harness.quant.compute_qparams` / `quantize` (float32, same operations in
the same order, division rather than multiplication by a reciprocal), so a packed layer sees the very codes the
fake-quant `QLinear` it replaces rounds to; only the final float accumulation order differs. It is written out
here rather than called because the generic helpers build intermediate `QParams`, reshape for groups and run
separate min and max reductions: at decode (one token) those small ops cost more than the GEMM itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.packing import code_centre
from qvlm_harness.quant.quantizer import MIN_SCALE, qrange


@dataclass
class QuantizedActivations:
    """``x ~= scale * (codes - zero)`` row by row: int8 codes ``[M, K]``, float32 scale and int32 zero either
    ``[M, 1]`` (per token) or ``[]`` (per tensor); the zero is centred like the codes (0 when symmetric)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor


def activation_qparams(x: Tensor, bits: int, symmetric: bool, per_token: bool, *,
                       what: str = "the activations") -> tuple[Tensor, Tensor]:
    """Dynamic (scale, uncentred zero point) of a 2-D float32 input, as `compute_qparams` computes them."""
    if per_token:
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    else:
        lo, hi = torch.aminmax(x)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
    else:
        lo = lo.clamp(max=0.0)
        scale = (hi.clamp(min=0.0) - lo) / (qmax - qmin)
    scale = scale.clamp(min=MIN_SCALE)
    if not bool(torch.isfinite(scale).all()):
        raise HarnessError(f"NaN or inf in {what}: check the model dtype (fp16 overflow?) and the input")
    if symmetric:
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zero = torch.round(qmin - lo / scale).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def quantize_activations(x: Tensor, bits: int, symmetric: bool, *, per_token: bool = True,
                         scale: Tensor | None = None, zero: Tensor | None = None,
                         what: str = "the activations") -> QuantizedActivations:
    """Quantize a 2-D input ``[M, K]`` to centred int8 codes.

    Dynamic unless `scale` and `zero` (static per-tensor QParams, uncentred zero) are given.
    """
    xf = x.float()
    if scale is None or zero is None:
        scale, zero = activation_qparams(xf, bits, symmetric, per_token, what=what)
    qmin, qmax = qrange(bits, symmetric)
    c = code_centre(bits, symmetric)
    zc = zero - c
    # round(x/s) + z - c, clamped to [qmin - c, qmax - c]: integer-valued float ops, so identical to centring
    # the codes `quantize` returns.
    q = torch.round(xf / scale).add_(zc).clamp_(qmin - c, qmax - c).to(torch.int8)
    return QuantizedActivations(q, scale, zc.to(torch.int32))
