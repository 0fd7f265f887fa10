"""Quantization math: checked against an independent brute-force numpy reference (nearest grid level)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvlm_harness.errors import HarnessError
from qvlm_harness.quant import (
    MIN_SCALE,
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_per_tensor,
    fake_quantize_per_token,
    fake_quantize_weight,
    mse_search_range,
    quantize,
    quantize_per_token,
    quantize_weight,
    weight_qparams,
)

BITS = [2, 3, 4, 6, 8]


# -- independent reference -----------------------------------------------------------------------------------


def ref_levels(bits: int, sym: bool) -> np.ndarray:
    if sym:
        q = 2 ** (bits - 1) - 1
        return np.arange(-q, q + 1, dtype=np.float64)
    return np.arange(0, 2**bits, dtype=np.float64)


def ref_qparams(values: np.ndarray, bits: int, sym: bool) -> tuple[float, float]:
    """Scale and zero point of one slice, computed from the definitions (float64)."""
    lo, hi = float(values.min()), float(values.max())
    if sym:
        return max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1), 0.0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2**bits - 1)
    return scale, float(np.round(-lo / scale))


def ref_nearest(values: np.ndarray, scale: float, zp: float, bits: int, sym: bool):
    """For each value, the distances to every grid level (loop over the 2^b levels) and the nearest code."""
    levels = ref_levels(bits, sym)
    dist = np.stack([np.abs(values - (q - zp) * scale) for q in levels], axis=-1)
    return dist, levels[dist.argmin(axis=-1)]


def check_slice(values, codes, deq, scale, zp, bits, sym):
    """Codes of one slice are the nearest grid level; dequantized values and error bound match."""
    values = np.asarray(values, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.float64)
    ref_scale, ref_zp = ref_qparams(values, bits, sym)
    assert scale == pytest.approx(ref_scale, rel=1e-5)
    assert zp == ref_zp
    levels = ref_levels(bits, sym)
    assert codes.min() >= levels[0] and codes.max() <= levels[-1]
    dist, ref_codes = ref_nearest(values, scale, zp, bits, sym)
    ours = np.take_along_axis(dist, (codes - levels[0]).astype(np.int64)[:, None], axis=-1)[:, 0]
    best = dist.min(axis=-1)
    # Optimal up to float rounding; exactly the reference code wherever the nearest level is unambiguous.
    assert np.all(ours <= best + 1e-5 * scale)
    second = np.sort(dist, axis=-1)[:, 1]
    clear = (second - best) > 1e-4 * scale
    assert np.array_equal(codes[clear], ref_codes[clear])
    np.testing.assert_allclose(np.asarray(deq, np.float64), (codes - zp) * scale, rtol=1e-6, atol=1e-12)
    assert np.all(np.abs(np.asarray(deq, np.float64) - values) <= scale / 2 * (1 + 1e-5) + 1e-12)


def sample(shape, seed=0, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g).add(0.1) + shift
    x[0] = x[0].abs()  # an all-positive slice: asymmetric must still include 0
    return x


# -- brute-force comparison, all granularities ---------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_per_tensor_matches_reference(bits, sym):
    x = sample((5, 24), seed=bits)
    qp = compute_qparams(x.amin(), x.amax(), bits, sym)
    codes = quantize(x, qp)
    deq = dequantize(codes, qp)
    check_slice(
        x.flatten().numpy(),
        codes.flatten().numpy(),
        deq.flatten().numpy(),
        float(qp.scale),
        float(qp.zero_point),
        bits,
        sym,
    )
    assert torch.equal(fake_quantize(x, qp), deq)
    assert torch.equal(fake_quantize_per_tensor(x, qp), deq)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_per_channel_weight_matches_reference(bits, sym):
    w = sample((6, 20), seed=10 + bits)
    codes, qp = quantize_weight(w, bits, sym)
    assert qp.scale.shape == (6, 1) and qp.group_size is None
    deq = dequantize(codes, qp)
    for r in range(w.shape[0]):
        check_slice(
            w[r].numpy(),
            codes[r].numpy(),
            deq[r].numpy(),
            float(qp.scale[r, 0]),
            float(qp.zero_point[r, 0]),
            bits,
            sym,
        )
    assert torch.equal(fake_quantize_weight(w, bits, sym), deq)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_per_group_weight_matches_reference(bits, sym):
    g = 8
    w = sample((4, 32), seed=20 + bits)
    w[1, 8:16] = w[1, 8:16].abs()
    codes, qp = quantize_weight(w, bits, sym, group_size=g)
    assert codes.shape == w.shape
    assert qp.scale.shape == (4, 32 // g) and qp.group_size == g
    deq = dequantize(codes, qp)
    for r in range(w.shape[0]):
        for j in range(32 // g):
            sl = slice(j * g, (j + 1) * g)
            check_slice(
                w[r, sl].numpy(),
                codes[r, sl].numpy(),
                deq[r, sl].numpy(),
                float(qp.scale[r, j]),
                float(qp.zero_point[r, j]),
                bits,
                sym,
            )
    assert torch.equal(fake_quantize_weight(w, bits, sym, group_size=g), deq)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_per_token_matches_reference(bits, sym):
    x = sample((6, 16), seed=30 + bits).reshape(2, 3, 16)
    codes, qp = quantize_per_token(x, bits, sym)
    assert codes.shape == x.shape and qp.scale.shape == (2, 3, 1)
    deq = dequantize(codes, qp)
    flat_x, flat_c, flat_d = x.reshape(-1, 16), codes.reshape(-1, 16), deq.reshape(-1, 16)
    flat_s, flat_z = qp.scale.reshape(-1), qp.zero_point.reshape(-1)
    for r in range(6):
        check_slice(
            flat_x[r].numpy(),
            flat_c[r].numpy(),
            flat_d[r].numpy(),
            float(flat_s[r]),
            float(flat_z[r]),
            bits,
            sym,
        )
    assert torch.equal(fake_quantize_per_token(x, bits, sym), deq)


def test_per_tensor_weight_granularity():
    w = sample((4, 8), seed=3)
    qp = weight_qparams(w, 4, True, group_size=-1)
    qp2 = weight_qparams(w, 4, True, granularity="tensor")
    assert qp.scale.shape == (1, 1)
    assert torch.equal(qp.scale, qp2.scale)
    assert float(qp.scale) == pytest.approx(float(w.abs().max()) / 7, rel=1e-6)


def test_ranges_and_code_dtypes():
    x = torch.linspace(-3, 3, 101)
    for bits in range(2, 9):
        for sym in (True, False):
            qp = compute_qparams(x.min(), x.max(), bits, sym)
            codes = quantize(x * 10, qp)  # far outside the range: clamped to the ends
            expected = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
            assert (qp.qmin, qp.qmax) == expected
            assert (int(codes.min()), int(codes.max())) == expected
            assert codes.dtype == (torch.int8 if sym else torch.uint8)
    assert compute_qparams(-1.0, 1.0, 4, True).qmax == 7
    assert compute_qparams(-1.0, 1.0, 8, True).qmin == -127


def test_round_half_to_even():
    qp = QParams(torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), 8, True)
    codes = quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), qp)
    assert codes.tolist() == [0, 2, 2, 0, -2]


# -- zero, degenerate ranges, non-finite input ---------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_range_represents_zero_exactly(bits):
    cases = [(0.37, 5.1), (-4.2, -0.01), (-1.3, 2.9), (-1e-3, 7.0)]
    for lo, hi in cases:
        qp = compute_qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric=False)
        assert qp.qmin <= int(qp.zero_point) <= qp.qmax
        zero = torch.zeros(3)
        assert torch.equal(dequantize(quantize(zero, qp), qp), zero)
        # the range actually used covers [min(lo, 0), max(hi, 0)] up to half a step
        top = float((qp.qmax - qp.zero_point) * qp.scale)
        bottom = float((qp.qmin - qp.zero_point) * qp.scale)
        half = float(qp.scale) / 2 * (1 + 1e-5)  # the rounded zero point shifts the grid by <= half a step
        assert bottom <= min(lo, 0.0) + half and top >= max(hi, 0.0) - half


@pytest.mark.parametrize("sym", [True, False])
def test_scales_finite_for_zero_constant_and_tiny_rows(sym):
    w = torch.zeros(4, 16)
    w[1] = 5.0  # constant row
    w[2] = 1e-30  # tiny
    w[3] = torch.linspace(-1e-12, 1e-12, 16)
    for group in (None, 8, -1):
        codes, qp = quantize_weight(w, 4, sym, group)
        assert torch.isfinite(qp.scale).all() and (qp.scale >= MIN_SCALE).all()
        deq = dequantize(codes, qp)
        assert torch.isfinite(deq).all()
        assert torch.equal(deq[0], torch.zeros(16))
        assert (deq[2:] - w[2:]).abs().max() <= MIN_SCALE
    codes, qp = quantize_weight(w, 4, sym)
    assert torch.allclose(dequantize(codes, qp)[1], w[1], rtol=1e-6)
    xq = fake_quantize_per_token(torch.zeros(3, 8), 8, sym)
    assert torch.equal(xq, torch.zeros(3, 8))


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "inf")])
def test_non_finite_inputs_raise_one_line_error(bad, word):
    w = torch.randn(4, 8)
    w[2, 3] = bad
    with pytest.raises(HarnessError) as err:
        quantize_weight(w, 4, True, name="model.layers.0.mlp")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(word) and "model.layers.0.mlp" in msg
    x = torch.randn(2, 3, 8)
    x[1, 1, 0] = bad
    with pytest.raises(HarnessError, match=word):
        fake_quantize_per_token(x, 8, False)
    with pytest.raises(HarnessError, match="calibration activations"):
        compute_qparams(torch.tensor(bad), torch.tensor(1.0), 8, False, what="the calibration activations")


def test_group_size_not_dividing_width_names_width():
    w = torch.randn(4, 30)
    with pytest.raises(HarnessError) as err:
        quantize_weight(w, 4, True, group_size=8, name="lm.q_proj")
    msg = str(err.value)
    assert "30" in msg and "8" in msg and "lm.q_proj" in msg and "\n" not in msg


def test_invalid_bits_rejected():
    with pytest.raises(HarnessError):
        compute_qparams(-1.0, 1.0, 1, True)
    with pytest.raises(HarnessError):
        compute_qparams(-1.0, 1.0, 16, False)


# -- straight-through estimator ------------------------------------------------------------------------------


def test_ste_gradients():
    x = torch.tensor([-3.0, -0.4, 0.26, 0.9, 5.0], requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    qp = QParams(scale, torch.tensor(0, dtype=torch.int32), 4, True)  # range [-0.7, 0.7]
    y = fake_quantize(x, qp, ste=True)
    assert torch.allclose(y, fake_quantize(x.detach(), qp.detach()))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]  # 0.9 and +-3, 5 are clipped
    assert scale.grad is not None and torch.isfinite(scale.grad) and float(scale.grad) != 0.0
    z = torch.randn(4, requires_grad=True)
    assert not fake_quantize(z, qp).requires_grad  # the plain path is detached math


def test_bf16_input_keeps_dtype():
    x = torch.randn(3, 16).to(torch.bfloat16)
    y = fake_quantize_per_token(x, 8, False)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), fake_quantize_per_token(x.float(), 8, False), atol=2e-2)


# -- MSE range search ----------------------------------------------------------------------------------------


def ref_mse(values: np.ndarray, lo: float, hi: float, bits: int, sym: bool) -> float:
    """Brute-force MSE of quantizing `values` with the range [lo, hi] (nearest grid level)."""
    if sym:
        scale, zp = max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1), 0.0
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / (2**bits - 1)
        zp = float(np.round(-lo / scale))
    levels = ref_levels(bits, sym)
    grid = (levels - zp) * scale
    nearest = grid[np.abs(values[:, None] - grid[None, :]).argmin(axis=1)]
    return float(np.mean((nearest - values) ** 2))


def outlier_data(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[:, 0] = 12.0 * torch.rand(rows, generator=g) + 4.0  # an outlier per row
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_mse_search_never_worse_than_minmax_per_tensor(bits, sym):
    x = outlier_data(8, 64, seed=bits)
    lo, hi = mse_search_range(x, bits, sym)
    assert lo.shape == () and hi.shape == ()
    v = x.flatten().double().numpy()
    searched = ref_mse(v, float(lo), float(hi), bits, sym)
    plain = ref_mse(v, float(x.min()), float(x.max()), bits, sym)
    assert searched <= plain * (1 + 1e-6)
    # it is the best of its grid of shrink factors (brute force over the same grid)
    alphas = np.linspace(1.0, 0.2, 100)
    best = min(ref_mse(v, a * float(x.min()), a * float(x.max()), bits, sym) for a in alphas)
    assert searched <= best * (1 + 1e-4)
    if bits == 4:
        assert searched < 0.9 * plain  # with outliers, clipping clearly helps at 4 bits


@pytest.mark.parametrize("sym", [True, False])
def test_mse_search_per_channel(sym):
    x = outlier_data(6, 48, seed=7)
    x[2] = 0.0  # degenerate row stays finite
    lo, hi = mse_search_range(x, 3, sym, dim=1, grid=50)
    assert lo.shape == (6, 1) and hi.shape == (6, 1)
    for r in range(6):
        v = x[r].double().numpy()
        if r == 2:
            continue
        searched = ref_mse(v, float(lo[r]), float(hi[r]), 3, sym)
        assert searched <= ref_mse(v, float(v.min()), float(v.max()), 3, sym) * (1 + 1e-6)
    codes, qp = quantize_weight(x, 3, sym, mse=True)
    assert torch.isfinite(qp.scale).all()
    err_mse = (dequantize(codes, qp) - x).square().sum()
    err_plain = (fake_quantize_weight(x, 3, sym) - x).square().sum()
    assert err_mse <= err_plain


def test_mse_search_is_deterministic():
    x = outlier_data(4, 32, seed=1)
    a = mse_search_range(x, 4, False, dim=1)
    b = mse_search_range(x.clone(), 4, False, dim=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
