"""Exact integer GEMM through `torch._int_mm` (int8 x int8 -> int32) on CPU and CUDA.

`torch._int_mm` has no shape constraints on CPU. On CUDA (cuBLASLt, sm80+) it needs ``M > 16`` and ``K``, ``N``
multiples of 8, and the second operand column-major; `int_mm` pads with zeros (which add nothing to the
integer sums) and slices the result back, so callers never see the constraint. `pad_rule` is the rule used;
tests force the CUDA rule on CPU to check the padding itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
    mp = max(m, rule.min_m + 1) if rule.min_m else m
    kp, np_ = _round_up(k, rule.k_multiple), _round_up(n, rule.n_multiple)
    if (mp, kp) != (m, k):
        a = F.pad(a, (0, kp - k, 0, mp - m))
    if (kp, np_) != (k, n):
        # pad the [N, K] (row-major) view, then transpose back: keeps b column-major, as cuBLASLt wants
        b = F.pad(b.t(), (0, kp - k, 0, np_ - n)).t()
    elif a.device.type == "cuda" and not b.t().is_contiguous():
        b = b.t().contiguous().t()
    out = torch._int_mm(a, b)
    if (mp, np_) != (m, n):
        out = out[:m, :n]
    return out
