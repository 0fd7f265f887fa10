"""Storage formats of integer weight codes, and the conversion of `QLinear` codes into them.

Two formats cover 2..8 bits:

* ``int8``: one signed byte per value (5..8 bits; 6-bit codes live in int8 storage and use the int8 GEMM).
* ``int4``: two values per byte (2..4 bits). Values ``v`` in ``[-8, 7]`` are stored as nibbles ``v + 8``.
  Layout: the last dim is padded with zeros to a multiple of `INT4_BLOCK` (64) and each block of 64 values
  becomes 32 bytes, byte ``b`` holding value ``b`` in its low nibble and value ``b + 32`` in its high nibble.
  Both halves of a block unpack with one mask or one shift into two contiguous runs of 32 values, which is what
  a SIMD kernel wants (one 256-bit load -> 64 signed bytes) and what makes the torch unpack two elementwise ops
  and a concatenation.

Codes are stored *centred*: ``stored = code - centre`` so they fit a signed byte / a nibble (asymmetric 8-bit
codes 0..255 become -128..127; asymmetric 4-bit codes 0..15 become -8..7). The zero point is centred the same
way, so ``code - zero = stored - (zero - centre)`` and no information is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from qvlm_harness.errors import HarnessError

INT4_BLOCK = 64
Format = Literal["int8", "int4"]


def storage_format(bits: int) -> Format:
    """The storage format for `bits`-bit codes: nibbles up to 4 bits, bytes up to 8."""
    if 2 <= bits <= 4:
        return "int4"
    if 5 <= bits <= 8:
        return "int8"
    raise HarnessError(f"packed storage holds 2..8-bit codes, got {bits} bits")


def code_centre(bits: int, symmetric: bool) -> int:
    """What is subtracted from a code so it fits its storage (0 when it already does)."""
    if symmetric:
        return 0  # restricted signed range [-(2^(b-1)-1), 2^(b-1)-1] fits int8 and, for b <= 4, a nibble
    if storage_format(bits) == "int4":
        return 8  # 0..15 -> -8..7
    return 128 if bits == 8 else 0  # 0..255 -> -128..127; 0..127 (<= 7 bits) already fits


def padded_width(k: int) -> int:
    """Width of the int4 layout for `k` values (padded up to a whole block)."""
    return -(-k // INT4_BLOCK) * INT4_BLOCK


def pack_int4(values: Tensor) -> Tensor:
    """Pack signed values in ``[-8, 7]`` along the last dim into the block-interleaved nibble layout.

    ``[..., K]`` (any integer dtype) -> uint8 ``[..., padded_width(K) // 2]``. Padding values are 0.
    """
    if values.is_floating_point():
        raise TypeError("pack_int4 takes integer values")
    if values.numel() and (int(values.min()) < -8 or int(values.max()) > 7):
        raise ValueError(f"int4 values must lie in [-8, 7], got [{int(values.min())}, {int(values.max())}]")
    *lead, k = values.shape
    kp = padded_width(k)
    v = values.to(torch.int16)
    if kp != k:
        v = torch.nn.functional.pad(v, (0, kp - k))
    nib = (v + 8).to(torch.uint8).reshape(*lead, kp // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (nib[..., 0, :] | (nib[..., 1, :] << 4)).reshape(*lead, kp // 2)


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """Inverse of `pack_int4`: uint8 ``[..., padded_width(k) // 2]`` -> int8 ``[..., k]``."""
    *lead, half = packed.shape
    if half * 2 != padded_width(k):
        raise ValueError(f"packed width {half} does not hold {k} int4 values (expected {padded_width(k) // 2})")
    blocks = packed.reshape(*lead, half * 2 // INT4_BLOCK, INT4_BLOCK // 2)
    lo = (blocks & 15).view(torch.int8)
    hi = (blocks >> 4).view(torch.int8)
    out = torch.cat([lo, hi], dim=-1).reshape(*lead, half * 2).sub_(8)
    return out[..., :k] if k != half * 2 else out


@dataclass
class PackedCodes:
    """Integer weight codes ``[out, in]`` in their storage format, plus what it takes to read them back."""

    data: Tensor  # int8 [out, in] or uint8 [out, padded_width(in) // 2]
    bits: int
    symmetric: bool
    in_features: int

    @property
    def fmt(self) -> Format:
        return storage_format(self.bits)

    @property
    def centre(self) -> int:
        return code_centre(self.bits, self.symmetric)

    def centred(self) -> Tensor:
        """Centred codes as int8 ``[out, in]`` (``code - centre``)."""
        return self.data if self.fmt == "int8" else unpack_int4(self.data, self.in_features)

    def codes(self) -> Tensor:
        """The original codes (int8 for symmetric, uint8 for asymmetric), as `QLinear.codes` holds them."""
        c = self.centred().to(torch.int16) + self.centre
        return c.to(torch.int8 if self.symmetric else torch.uint8)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def pack_codes(codes: Tensor, bits: int, symmetric: bool) -> PackedCodes:
    """Pack `QLinear`-style codes ``[out, in]`` (int8 symmetric / uint8 asymmetric, values in the `bits` range)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got {tuple(codes.shape)}")
    centred = codes.to(torch.int16) - code_centre(bits, symmetric)
    fmt = storage_format(bits)
    if fmt == "int8":
        if centred.numel() and (int(centred.min()) < -128 or int(centred.max()) > 127):
            raise ValueError(f"{bits}-bit codes out of range for int8 storage")
        data = centred.to(torch.int8).contiguous()
    else:
        data = pack_int4(centred)
    return PackedCodes(data, bits, symmetric, codes.shape[1])
