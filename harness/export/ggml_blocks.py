"""GGML's block-32 weight formats built from integer codes the harness already has (no re-quantization).

Both formats split each row of a weight ``[out, in]`` into blocks of `BLOCK` (32) consecutive input channels and
give every block one float16 scale ``d``:

* ``Q8_0`` (34 bytes a block): ``d``, then 32 signed bytes ``q``; the weight is ``d * q``.
* ``Q4_0`` (18 bytes a block): ``d``, then 16 bytes holding 32 nibbles ``n``: byte ``j`` has value ``j`` in its
  low nibble and value ``j + 16`` in its high nibble; the weight is ``d * (n - 8)``.

A symmetric harness grid (codes in the restricted range ``[-(2^(b-1)-1), 2^(b-1)-1]``, zero point 0, one scale per
group of `g` input channels or per output channel) maps onto these exactly when every block of 32 lies inside one
scale group: ``q = code`` (Q8_0, up to 8 bits) or ``n = code + 8`` (Q4_0, up to 4 bits), ``d`` = the group's scale.
The one rounding is the scale's: GGML stores ``d`` in float16 where the harness keeps float32, so an exported
weight is ``code * fp16(scale)`` (a relative change below 2^-11 while the scale is a normal float16 number).
llama.cpp's own quantizer picks another grid (Q4_0: ``d = max / -8``, codes 0..15); these functions never choose
a grid, they write the one they are given.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
Q8_0_BYTES = 2 + BLOCK
Q4_0_BYTES = 2 + BLOCK // 2
FP16_MAX = float(np.finfo(np.float16).max)


def block_scales(scale: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """float32 ``[out, in // 32]``: the scale of every block of 32, from a ``[out or 1, groups]`` scale whose groups
    are whole multiples of 32 wide (per channel: one group; per tensor: one row and one group)."""
    if in_features % BLOCK:
        raise ValueError(f"input width {in_features} is not a multiple of {BLOCK}")
    groups = scale.shape[1]
    if in_features % groups or (in_features // groups) % BLOCK:
        raise ValueError(f"{groups} scale group(s) over {in_features} inputs are not whole blocks of {BLOCK}")
    per_group = in_features // groups // BLOCK
    rows = np.broadcast_to(scale.astype(np.float32), (out_features, groups))
    return np.repeat(rows, per_group, axis=1)


def fp16_scales(scales: np.ndarray) -> np.ndarray:
    """The float16 block scales; a scale float16 cannot hold (above 65504) is an error, not an inf."""
    if scales.size and float(np.abs(scales).max()) > FP16_MAX:
        raise ValueError(f"a block scale of {float(np.abs(scales).max()):.3g} exceeds float16's range")
    return scales.astype(np.float16)


def pack_q8_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 ``[out, in // 32 * 34]`` Q8_0 rows from int codes ``[out, in]`` in [-127, 127] (any <= 8-bit
    symmetric grid) and float32 block scales ``[out, in // 32]``."""
    out, k = codes.shape
    if codes.size and (int(codes.min()) < -127 or int(codes.max()) > 127):
        raise ValueError("Q8_0 codes must lie in [-127, 127]")
    d = fp16_scales(scales).reshape(out, k // BLOCK, 1).view(np.uint8)
    q = codes.astype(np.int8).reshape(out, k // BLOCK, BLOCK).view(np.uint8)
    return np.concatenate([d, q], axis=-1).reshape(out, -1)


def pack_q4_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 ``[out, in // 32 * 18]`` Q4_0 rows from int codes ``[out, in]`` in [-8, 7] (any <= 4-bit symmetric
    grid; the harness's restricted 4-bit range is [-7, 7]) and float32 block scales ``[out, in // 32]``."""
    out, k = codes.shape
    if codes.size and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("Q4_0 codes must lie in [-8, 7]")
    d = fp16_scales(scales).reshape(out, k // BLOCK, 1).view(np.uint8)
    nib = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(out, k // BLOCK, 2, BLOCK // 2)
    qs = nib[..., 0, :] | (nib[..., 1, :] << np.uint8(4))
    return np.concatenate([d, qs], axis=-1).reshape(out, -1)


def exported_weight(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 ``[out, in]``: what a reader dequantizes from the packed blocks, ``code * fp16(d)`` (for checks and
    for the summary's worst scale rounding)."""
    out, k = codes.shape
    d = fp16_scales(scales).astype(np.float32).reshape(out, k // BLOCK, 1)
    return (codes.astype(np.float32).reshape(out, k // BLOCK, BLOCK) * d).reshape(out, k)
