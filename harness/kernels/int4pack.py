"""torch's int4 weight-only GEMM ("tinygemm") on CUDA: the byte layout it is fed, its shape rules, and when it runs.

``aten._convert_weight_to_int4pack(w, inner_k_tiles)`` (CUDA) takes uint8 ``[N, K/2]``: two 4-bit values per
byte, the value at an even column ``2j`` in the *high* nibble of byte ``j`` and the odd column ``2j + 1`` in the
low nibble (aten/src/ATen/native/cuda/int4mm.cu, ``matrix_to_m16n8k16_Bint4_layout``: "v[3]L | v[2]L | v[1]L |
v[0]L | v[3]H | v[2]H | v[1]H | v[0]H" equals the int32 values "v[7] | v[5] | v[3] | v[1] | v[6] | v[4] | v[2] |
v[0]"). It returns int32 ``[N/8, K/(16*inner_k_tiles), 32, inner_k_tiles/2]``; ``inner_k_tiles`` is 2, 4 or 8
and ``K`` must be a multiple of ``16 * inner_k_tiles``. ``aten._weight_int4pack_mm(x, w, group, scales_and_zeros)``
then takes bfloat16 ``x [M, K]`` (contiguous), a group size of 32, 64, 128 or 256 dividing ``K``, and bfloat16
``scales_and_zeros [K/group, N, 2]``, and computes ``w = (nibble - 8) * scale + zero`` per group, as the CPU op
(`qvlm_harness.kernels.linear.WeightOnlyLinear`) does, in bfloat16. The kernel is compiled for compute
capability 8.0 and newer only (tensor-core m16n8k16 tiles); elsewhere `cuda_int4pack_blocker` says why, and the
layer keeps its packed codes and dequantizes them per call instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

INNER_K_TILES = (8, 4, 2)
K_TILE = 16
MIN_CAPABILITY = (8, 0)


def tinygemm_bytes(nibbles: Tensor) -> Tensor:
    """Unsigned nibbles ``[N, K]`` (values 0..15, K even) -> uint8 ``[N, K/2]`` in the CUDA op's input order:
    column ``2j`` in the high nibble of byte ``j``, column ``2j + 1`` in its low nibble."""
    if nibbles.dim() != 2 or nibbles.shape[1] % 2:
        raise ValueError(f"tinygemm_bytes takes [N, K] with K even, got {tuple(nibbles.shape)}")
    v = nibbles.to(torch.int32)
    return ((v[:, 0::2] << 4) | v[:, 1::2]).to(torch.uint8)


def tinygemm_nibbles(packed: Tensor) -> Tensor:
    """Inverse of `tinygemm_bytes` (for tests and checks): uint8 ``[N, K/2]`` -> int32 ``[N, K]``."""
    b = packed.to(torch.int32)
    return torch.stack([b >> 4, b & 15], dim=-1).reshape(packed.shape[0], -1)


def inner_k_tiles(k: int) -> int | None:
    """The widest inner-k-tile count whose tile (16 x tiles) divides `k`; None when even 32 does not."""
    return next((t for t in INNER_K_TILES if k % (K_TILE * t) == 0), None)


def cuda_int4pack_blocker(device: torch.device | str) -> str | None:
    """Why torch's CUDA int4 kernel cannot run on `device` (None when it can)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"not a CUDA device ({dev})"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm") or not hasattr(torch.ops.aten, "_convert_weight_to_int4pack"):
        return f"torch {torch.__version__} has no aten._weight_int4pack_mm"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    cap = torch.cuda.get_device_capability(dev)
    if tuple(cap) < MIN_CAPABILITY:
        return (f"compute capability {cap[0]}.{cap[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (the tinygemm "
                "kernel needs tensor-core m16n8k16 tiles)")
    return None
