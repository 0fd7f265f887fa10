"""GPTQ solver against a slow, unblocked textbook implementation, and against RTN on the layer objective."""

from __future__ import annotations

import pytest
import torch

from qvlm_harness.quant.gptq import HessianAccumulator, gptq_quantize
from qvlm_harness.quant.quantizer import compute_qparams, dequantize, fake_quantize_weight, qrange


def textbook_gptq(W, H, bits, symmetric, group=None, percdamp=0.01):
    """One column at a time: quantize, then update every later column with the exact inverse-Hessian step
    (Optimal Brain Quantization), re-inverting the Hessian restricted to the remaining columns each time."""
    W = W.double().clone()
    H = H.double().clone()
    n = W.shape[1]
    H += percdamp * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64)
    qmin, qmax = qrange(bits, symmetric)
    Q = torch.zeros_like(W)
    if group is None:
        qp = compute_qparams(W.amin(1).float(), W.amax(1).float(), bits, symmetric)
    for j in range(n):
        if group is not None and j % group == 0:
            blk = W[:, j:j + group]
            qp = compute_qparams(blk.amin(1).float(), blk.amax(1).float(), bits, symmetric)
        s, z = qp.scale.double().reshape(-1), qp.zero_point.double().reshape(-1)
        q = (torch.clamp(torch.round(W[:, j] / s) + z, qmin, qmax) - z) * s
        Q[:, j] = q
        Hinv = torch.linalg.inv(H[j:, j:])  # inverse Hessian of the not-yet-quantized columns
        err = (W[:, j] - q) / Hinv[0, 0]
        W[:, j:] -= err[:, None] * Hinv[0, :][None, :]
    return Q.float()


def layer(seed=0, out=24, inp=256, tokens=600):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(tokens, inp, generator=g) * (1 + 3 * torch.rand(inp, generator=g))  # uneven channels
    X[:, :8] += 2.0 * torch.randn(tokens, 1, generator=g)  # correlated channels
    acc = HessianAccumulator(inp)
    acc.add(X[:300])
    acc.add(X[300:])
    return W, X, acc.value()


@pytest.mark.parametrize(("bits", "sym", "group"), [(4, True, None), (3, False, None), (4, True, 64)])
def test_blocked_gptq_equals_textbook(bits, sym, group):
    W, X, H = layer()
    res = gptq_quantize(W, H, bits, sym, group, block_size=128)
    ref = textbook_gptq(W, H, bits, sym, group)
    assert torch.allclose(res.weight, ref, atol=1e-4), (res.weight - ref).abs().max()
    assert torch.equal(dequantize(res.codes, res.qparams), res.weight)


@pytest.mark.parametrize(("act_order", "group"), [(False, None), (True, None), (True, 64), (False, 32)])
def test_gptq_beats_rtn_on_the_layer_objective(act_order, group):
    W, X, H = layer(seed=1)
    res = gptq_quantize(W, H, 3, True, group, act_order=act_order)
    rtn = fake_quantize_weight(W, 3, True, group)
    err_gptq = ((X @ (W - res.weight).T) ** 2).mean()
    err_rtn = ((X @ (W - rtn).T) ** 2).mean()
    assert err_gptq < 0.9 * err_rtn
    assert res.codes.min() >= -3 and res.codes.max() <= 3
    if group:
        assert res.qparams.group_size == group and res.qparams.scale.shape == (W.shape[0], W.shape[1] // group)


def test_dead_columns_are_zeroed_and_hessian_accumulator_is_2xxt_over_n():
    W, X, _ = layer(seed=2, inp=64)
    X[:, 5] = 0
    acc = HessianAccumulator(64)
    acc.add(X)
    H = acc.value()
    assert torch.allclose(H.double(), 2 * X.T.double() @ X.double() / X.shape[0], atol=1e-3)
    res = gptq_quantize(W, H, 4, True)
    assert torch.all(res.weight[:, 5] == 0)
