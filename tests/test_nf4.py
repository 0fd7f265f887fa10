"""NF4 (QLoRA) against bitsandbytes: codes, absmax, double-quant state and dequantized weights."""

from __future__ import annotations

import pytest
import torch

from qvlm_harness.config import QuantSpec
from qvlm_harness.quant.nf4 import (
    NF4_CODE,
    dynamic_code,
    nf_quantize,
    normal_float_codebook,
    pack_4bit,
    quantize_dynamic_blockwise,
    to_bnb,
    unpack_4bit,
)
from qvlm_harness.quant.nflinear import NFLinear

bnbf = pytest.importorskip("bitsandbytes.functional")


def weights(shape=(96, 320), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w[-1, :7] = 0.4  # a few outliers so blocks differ
    return w


@pytest.mark.parametrize("shape", [(96, 320), (64, 64), (3, 70)])
def test_first_level_state_matches_bitsandbytes_exactly(shape):
    w = weights(shape)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    mine = nf_quantize(w, backend="harness")
    assert torch.equal(pack_4bit(mine.codes), packed.reshape(-1))  # 4-bit codes, packed the same way
    assert torch.equal(unpack_4bit(packed, w.numel()), mine.codes)
    assert torch.equal(mine.offset, qs.offset)  # mean of the block absmax
    assert torch.equal(mine.absmax2, qs.state2.absmax)  # second-level absmax
    assert torch.equal(mine.code2, qs.state2.code) and torch.equal(dynamic_code(), bnbf.create_dynamic_map())
    assert torch.equal(normal_float_codebook(4), NF4_CODE)
    assert torch.allclose(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"), atol=0, rtol=0)


def test_double_quant_codes_are_the_nearest_entry_and_agree_with_bitsandbytes_cpu():
    w = weights((256, 576))
    _, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    mine = nf_quantize(w, backend="harness")
    # brute-force reference: nearest entry of the code (lower index on ties) of x / absmax per block of 256
    absmax = (mine.block_absmax() * 0)  # shape helper
    x = (nf_quantize(w, double_quant=False, backend="harness").absmax - mine.offset)
    code = dynamic_code()
    ref = []
    for b in range(0, x.numel(), 256):
        blk = x[b:b + 256]
        v = blk / blk.abs().max()
        ref.append(torch.argmin((v[:, None] - code[None, :]).abs(), dim=1))
    ref = torch.cat(ref).to(torch.uint8)
    assert absmax.numel() == x.numel()
    assert torch.equal(mine.absmax_q, ref)
    # bitsandbytes' compiled CPU kernel uses an approximate bucketed search: it agrees on >= 98% of entries
    agree = (mine.absmax_q == qs.absmax).float().mean()
    assert agree >= 0.98
    codes, _ = quantize_dynamic_blockwise(x, code)
    assert torch.equal(codes, mine.absmax_q)


def test_dequantization_and_bnb_state_are_bit_identical():
    w = weights((128, 192))
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    state = nf_quantize(w, backend="bnb")  # bitsandbytes' own state, converted
    assert torch.equal(state.dequantize(), bnbf.dequantize_4bit(packed, qs))
    p2, qs2 = to_bnb(state)
    assert torch.equal(p2.reshape(-1), packed.reshape(-1))
    assert torch.equal(bnbf.dequantize_4bit(p2, qs2), bnbf.dequantize_4bit(packed, qs))
    # the harness's own state dequantizes exactly like bitsandbytes would dequantize that same state
    mine = nf_quantize(w, backend="harness")
    p3, qs3 = to_bnb(mine)
    assert torch.equal(mine.dequantize(), bnbf.dequantize_4bit(p3, qs3))
    nodq = nf_quantize(w, double_quant=False, backend="harness")
    p4, qs4 = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(nodq.dequantize(), bnbf.dequantize_4bit(p4, qs4))


def test_nflinear_backends_agree_and_activation_quantizer_applies():
    w = weights((64, 128))
    bias = torch.randn(64)
    state = nf_quantize(w, backend="bnb")
    x = torch.randn(2, 5, 128)
    a = NFLinear(state, bias, QuantSpec.parse("w4a16"), backend="bnb")
    b = NFLinear(state, bias, QuantSpec.parse("w4a16"), backend="harness")
    assert torch.allclose(a(x), b(x), atol=1e-5)
    assert torch.allclose(b(x), x @ state.dequantize().T + bias, atol=1e-6)
    c = NFLinear(state, bias, QuantSpec.parse("w4a4"), backend="harness")
    assert not torch.allclose(c(x), b(x), atol=1e-4)
    assert c.weight_storage_bytes(True) < w.numel()  # ~0.5 byte per weight plus block statistics
    sd = b.state_dict()
    assert "weight" not in sd and {"qweight", "absmax_q", "absmax2", "code2", "offset"} <= set(sd)


def test_nf_codebook_construction_reproduces_nf4_and_generalises():
    from qvlm_harness.quant import nf4

    # the general construction at 4 bits lands on bitsandbytes' table
    n = 16
    offset = ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))) / 2
    assert abs(offset - 0.9677083) < 1e-6
    for bits in (2, 3, 5, 8):
        cb = normal_float_codebook(bits)
        assert cb.numel() == 2**bits and cb.min() == -1 and cb.max() == 1 and (cb == 0).sum() == 1
        assert torch.all(cb[1:] > cb[:-1])
    orig = nf4.NF4_CODE
    try:
        nf4.NF4_CODE = None  # force the general path for bits == 4 through a copy of the function
        half = 8
        pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
        neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
        vals = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
        assert torch.allclose((vals / vals.abs().max()).float(), orig, atol=2e-6)
    finally:
        nf4.NF4_CODE = orig
