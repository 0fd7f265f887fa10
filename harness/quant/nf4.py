"""NormalFloat (NF4, and its k-bit generalisation) blockwise quantization with double quantization, as in
QLoRA (Dettmers et al. 2023) and bitsandbytes.

Layout and arithmetic follow bitsandbytes' CPU path exactly, so the harness's own path and bitsandbytes give
bit-identical codes, statistics and dequantized weights (tests/test_nf4.py checks it):

* The weight is flattened (row-major) and cut into blocks of `blocksize` (64) values; each block stores its
  absmax and every value the index of the nearest codebook entry of ``value / absmax`` (bitsandbytes:
  ``clamp(x * (1 / absmax), -1, 1)`` bucketized against the midpoints of the sorted codebook; a trailing
  partial block is divided by its absmax instead).
* Double quantization: ``offset = mean(absmax)``; ``absmax - offset`` is quantized blockwise (256 values a
  block) to 8 bits with bitsandbytes' signed "dynamic" code (nearest entry, ties to the lower index).
* Dequantization: ``absmax = code8[q] * absmax2[block] + offset`` then ``w = nf[code] * absmax[block]``.
* 4-bit codes pack two to a byte, the first value of each pair in the high nibble.

One known difference: bitsandbytes' compiled CPU kernel for the 8-bit double-quantization step finds the code
entry with an approximate bucketed search that, for about 1% of the absmax values, returns a neighbour of the
nearest entry; the harness (like bitsandbytes' pure-torch kernel) takes the nearest. So when bitsandbytes is
importable, `nf_quantize(..., backend="auto")` takes the state from bitsandbytes itself, and the harness's
quantizer is used only where bitsandbytes cannot run; dequantization and execution from a given state are
bit-identical either way.

The 4-bit codebook is bitsandbytes' NF4 table. Other widths (`bits` 2..8) use the same construction QLoRA
describes (quantiles of N(0, 1), an exact zero, asymmetric halves, normalised to [-1, 1]); bitsandbytes has
no kernel for them, so they always run through the harness's path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qvlm_harness.errors import HarnessError

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
NF_BLOCKSIZE = 64
DQ_BLOCKSIZE = 256


def normal_float_codebook(bits: int = 4) -> Tensor:
    """The k-bit NormalFloat codebook (sorted, float32, ``2**bits`` entries in [-1, 1] with an exact 0).

    4 bits returns bitsandbytes' table. Other widths: ``2^(k-1)`` positive and ``2^(k-1) - 1`` negative
    normal quantiles between 0.5 and `offset`, where `offset` is the mean of the outermost quantile levels of
    ``2^k - 1`` and ``2^k`` equal bins (0.9677083 for k = 4, the value QLoRA uses), plus 0; then divided by the
    largest magnitude.
    """
    if bits == 4:
        return NF4_CODE.clone()
    if not 2 <= bits <= 8:
        raise HarnessError(f"NormalFloat supports 2..8 bits, got {bits}")
    n = 2**bits
    offset = ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))) / 2
    half = n // 2
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.abs().max()).float()


def dynamic_code() -> Tensor:
    """bitsandbytes' signed 8-bit "dynamic" (dynamic-exponent) code: 256 sorted float32 values in [-1, 1].

    For exponent e = 0..6 there are ``2^e`` fraction values: the midpoints of ``linspace(0.1, 1, 2^e + 1)``
    scaled by ``10^(e - 6)``, with both signs; plus 0 and 1.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * mids).tolist()
        values += (-(10 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


def quantize_dynamic_blockwise(x: Tensor, code: Tensor, blocksize: int = DQ_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization of a flat float32 tensor with a sorted 256-entry `code`.

    Per block: ``absmax = max |x|``, ``v = x / absmax``; the code index is the nearest entry (the lower one on
    a tie), searched with ``code[0]`` treated as -1 like bitsandbytes' CPU kernel. Returns (uint8 codes, float32
    absmax per block).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = _blocks(n, blocksize)
    padded = torch.zeros(nb * blocksize, dtype=torch.float32)
    padded[:n] = flat
    view = padded.view(nb, blocksize)
    absmax = view.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (view / safe[:, None]).reshape(-1)[:n]
    search = code.float().clone()
    search[0] = -1.0
    left = (torch.searchsorted(search, normed, right=True) - 1).clamp(0, search.numel() - 1)
    right = (left + 1).clamp(max=search.numel() - 1)
    take_right = (normed - search[right]).abs() < (normed - search[left]).abs()
    idx = torch.where(take_right & (left < search.numel() - 1), right, left)
    return idx.to(torch.uint8), absmax


def dequantize_dynamic_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int = DQ_BLOCKSIZE) -> Tensor:
    """``code[q] * absmax[block]`` (float32, flat)."""
    vals = code.float()[codes.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(blocksize)[: vals.numel()]
    return vals * scale


def nf_quantize_blocks(x: Tensor, code: Tensor, blocksize: int = NF_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """Blockwise NormalFloat codes (uint8, one per value, flat) and float32 absmax per block, with
    bitsandbytes' arithmetic (multiply by the reciprocal of the absmax, clamp to [-1, 1], bucketize against
    the codebook midpoints; a trailing partial block divides by its absmax)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].reshape(full // blocksize, blocksize)
    absmax = body.abs().amax(dim=-1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    c = code.float()
    bounds = (c[:-1] + c[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return q, absmax


def pack_4bit(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte, the first of each pair in the high nibble (bitsandbytes' layout)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[::2] << 4) | flat[1::2]


def unpack_4bit(packed: Tensor, numel: int) -> Tensor:
    p = packed.reshape(-1).to(torch.uint8)
    out = torch.empty(p.numel() * 2, dtype=torch.uint8)
    out[::2] = p >> 4
    out[1::2] = p & 0xF
    return out[:numel]


@dataclass
class NFState:
    """Everything needed to rebuild a NormalFloat-quantized weight (all tensors on CPU).

    `codes`: uint8 code per value (flat, unpacked); `absmax_q`: uint8 double-quantized block absmax;
    `absmax2`: float32 absmax of each block of 256 absmax values; `code2`: the 8-bit dynamic code; `offset`:
    float32 mean of the absmax (scalar). Without double quantization `absmax_q` is None and `absmax` holds the
    float32 block absmax.
    """

    shape: tuple[int, ...]
    bits: int
    blocksize: int
    codes: Tensor
    absmax: Tensor | None = None
    absmax_q: Tensor | None = None
    absmax2: Tensor | None = None
    code2: Tensor | None = None
    offset: Tensor | None = None
    blocksize2: int = DQ_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def codebook(self) -> Tensor:
        return normal_float_codebook(self.bits)

    def block_absmax(self) -> Tensor:
        """The float32 absmax per block that dequantization multiplies with (after undoing double quant)."""
        if not self.double_quant:
            assert self.absmax is not None
            return self.absmax.float()
        assert self.absmax2 is not None and self.code2 is not None and self.offset is not None
        return dequantize_dynamic_blockwise(self.absmax_q, self.absmax2, self.code2, self.blocksize2) + self.offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        vals = self.codebook[self.codes.reshape(-1).long()]
        scale = self.block_absmax().repeat_interleave(self.blocksize)[: vals.numel()]
        return (vals * scale).reshape(self.shape).to(dtype)


def bnb_available() -> bool:
    """True when bitsandbytes imports (its CPU kernels work on this machine)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # any import failure means "not available"
        return False
    return True


def nf_quantize_bnb(w: Tensor, blocksize: int = NF_BLOCKSIZE, double_quant: bool = True) -> NFState:
    """NF4 state computed by bitsandbytes' `quantize_4bit` (float32 input), converted to an `NFState`."""
    import bitsandbytes.functional as bnbf

    packed, qs = bnbf.quantize_4bit(w.detach().float().cpu().contiguous(), blocksize=blocksize,
                                    compress_statistics=double_quant, quant_type="nf4")
    state = NFState(tuple(w.shape), 4, blocksize, unpack_4bit(packed, w.numel()))
    if double_quant:
        state.absmax_q = qs.absmax.clone()
        state.absmax2 = qs.state2.absmax.clone()
        state.code2 = qs.state2.code.clone()
        state.offset = qs.offset.clone().reshape(())
        state.blocksize2 = qs.state2.blocksize
    else:
        state.absmax = qs.absmax.clone()
    return state


def to_bnb(state: NFState):
    """(packed uint8 weight, bitsandbytes QuantState) for a 4-bit state, to run bitsandbytes' kernels."""
    import bitsandbytes.functional as bnbf

    if state.bits != 4:
        raise HarnessError(f"bitsandbytes only has 4-bit NormalFloat kernels, not NF{state.bits}")
    code = NF4_CODE.clone()
    if state.double_quant:
        state2 = bnbf.QuantState(absmax=state.absmax2, code=state.code2, blocksize=state.blocksize2,
                                 dtype=torch.float32)
        qs = bnbf.QuantState(absmax=state.absmax_q, shape=torch.Size(state.shape), dtype=torch.float32,
                             blocksize=state.blocksize, code=code, quant_type="nf4", offset=state.offset,
                             state2=state2)
    else:
        qs = bnbf.QuantState(absmax=state.absmax, shape=torch.Size(state.shape), dtype=torch.float32,
                             blocksize=state.blocksize, code=code, quant_type="nf4")
    return pack_4bit(state.codes).unsqueeze(1), qs


def nf_quantize(w: Tensor, bits: int = 4, blocksize: int = NF_BLOCKSIZE, double_quant: bool = True,
                backend: str = "harness") -> NFState:
    """Quantize a weight to k-bit NormalFloat with block absmax scaling (and double quantization).

    `backend`: "harness" (this module's arithmetic), "bnb" (bitsandbytes' `quantize_4bit`; 4 bits only) or
    "auto" (bitsandbytes for 4 bits when it imports, else the harness).
    """
    if backend == "auto":
        backend = "bnb" if bits == 4 and bnb_available() else "harness"
    if backend == "bnb":
        return nf_quantize_bnb(w, blocksize, double_quant)
    if not torch.isfinite(w).all():
        raise HarnessError("NaN/inf in a weight to quantize to NormalFloat; check the model's weights")
    code = normal_float_codebook(bits)
    codes, absmax = nf_quantize_blocks(w.detach().cpu(), code, blocksize)
    state = NFState(tuple(w.shape), bits, blocksize, codes)
    if not double_quant:
        state.absmax = absmax
        return state
    offset = absmax.mean()
    code2 = dynamic_code()
    state.absmax_q, state.absmax2 = quantize_dynamic_blockwise(absmax - offset, code2, DQ_BLOCKSIZE)
    state.code2, state.offset = code2, offset
    return state


def nf_fake_quantize(w: Tensor, bits: int = 4, blocksize: int = NF_BLOCKSIZE, double_quant: bool = True) -> Tensor:
    """Quantize-dequantize a weight through NormalFloat (same shape and dtype)."""
    return nf_quantize(w, bits, blocksize, double_quant).dequantize(w.dtype).to(w.device)
