"""Exact integer GEMM through `torch._int_mm` (int8 x int8 -> int32) on CPU and CUDA.

`torch._int_mm` has no shape constraints on CPU. On CUDA (cuBLASLt, sm80+) it needs ``M > 16`` and ``K``, ``N``
multiples of 8, and the second operand column-major; `int_mm` pads with zeros (which add nothing to the
integer sums) and slices the result back, so callers never see the constraint. `pad_rule` is the rule used;
tests force the CUDA rule on CPU to check the padding itself. Where ``torch._int_mm`` itself fails on a CUDA
device (a GPU or build without cuBLASLt int8 kernels), the product falls back to float64, which is exact for
int8 operands, and one warning says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("qvlm_harness.kernels")


@dataclass(frozen=True)
class PadRule:
    """Shape constraints of the int8 GEMM on one device: M must exceed `min_m`, K and N be multiples."""

    min_m: int = 0
    k_multiple: int = 1
    n_multiple: int = 1


CPU_RULE = PadRule()
CUDA_RULE = PadRule(min_m=16, k_multiple=8, n_multiple=8)


def pad_rule(device: torch.device) -> PadRule:
    return CUDA_RULE if device.type == "cuda" else CPU_RULE


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def padded_shape(m: int, k: int, n: int, rule: PadRule) -> tuple[int, int, int]:
    """``(m, k, n)`` grown to the smallest shape `rule` accepts (``m > min_m``, ``k``/``n`` multiples)."""
    mp = max(m, rule.min_m + 1) if rule.min_m else m
    return mp, _round_up(k, rule.k_multiple), _round_up(n, rule.n_multiple)


def _exact_float64_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in float64 rounded back to int32: exact while every partial sum stays below 2**53, which int8
    operands guarantee for any K below 2**38 (each product is at most 2**14)."""
    return (a.double() @ b.double()).round_().to(torch.int32)


_fallback_logged: set[str] = set()


def int_mm(a: Tensor, b: Tensor, rule: PadRule | None = None) -> Tensor:
    """``a @ b`` exactly in int32 for int8 ``a [M, K]`` and int8 ``b [K, N]`` (any strides).

    Pads to the device's `PadRule` (or `rule`) and slices the result back to ``[M, N]``.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int_mm takes int8 operands, got {a.dtype} and {b.dtype}")
    m, k = a.shape
    k2, n = b.shape
    if k != k2:
        raise ValueError(f"inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    rule = pad_rule(a.device) if rule is None else rule
    mp, kp, np_ = padded_shape(m, k, n, rule)
    if (mp, kp) != (m, k):
        a = F.pad(a, (0, kp - k, 0, mp - m))
    if (kp, np_) != (k, n):
        # pad the [N, K] (row-major) view, then transpose back: keeps b column-major, as cuBLASLt wants
        b = F.pad(b.t(), (0, kp - k, 0, np_ - n)).t()
    elif a.device.type == "cuda" and not b.t().is_contiguous():
        b = b.t().contiguous().t()
    try:
        out = torch._int_mm(a, b)
    except RuntimeError as exc:
        if a.device.type != "cuda":
            raise
        # e.g. a GPU or a build without cuBLASLt int8 support: stay exact, say why once
        why = " ".join(str(exc).split())[:200]
        if why not in _fallback_logged:
            _fallback_logged.add(why)
            log.warning("harness: torch._int_mm failed on %s (%s); integer GEMMs use exact float64 products",
                        a.device, why)
        out = _exact_float64_mm(a, b)
    if (mp, np_) != (m, n):
        out = out[:m, :n]
    return out
