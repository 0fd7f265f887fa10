"""Q-VLM's learnable quantizers: AdaRound rounding, LSQ step sizes, and the freeze into `QLinear`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.methods.qvlm.options import QVLMOptions
from qvlm_harness.methods.qvlm.quantizers import ActQuantizer, AdaRoundWeight, LearnableQLinear, init_weight_qparams
from qvlm_harness.quant import MIN_SCALE, QLinear, dequantize, quantize


def linear(k=64, n=32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n)


@pytest.mark.parametrize("bits", ["w4a4", "w3a8g16", "w4a16-wasym"])
def test_adaround_starts_at_the_float_weight_and_hard_rounds_to_nearest(bits):
    spec = QuantSpec.parse(bits)
    lin = linear()
    qp = init_weight_qparams(lin.weight, spec, mse=True)
    ada = AdaRoundWeight(lin.weight, qp)
    w = lin.weight.detach().float()
    # soft weight at initialisation equals the weight wherever the weight is inside the grid's range
    lo = (qp.qmin - (qp.zero_point.float())) * qp.scale
    hi = (qp.qmax - (qp.zero_point.float())) * qp.scale
    if qp.group_size:
        lo, hi = lo.repeat_interleave(qp.group_size, dim=1), hi.repeat_interleave(qp.group_size, dim=1)
    inside = (w >= lo) & (w <= hi)
    assert torch.allclose(ada.soft_weight()[inside], w[inside], atol=1e-6)
    # hard rounding of the untouched variables is round-to-nearest on the same grid
    assert torch.equal(ada.codes().to(torch.int32), quantize(w, qp).to(torch.int32))
    assert torch.allclose(ada.hard_weight(), dequantize(quantize(w, qp), qp), atol=0)


def test_rounding_regulariser_is_zero_at_binary_h_and_largest_at_half():
    lin = linear()
    ada = AdaRoundWeight(lin.weight, init_weight_qparams(lin.weight, QuantSpec.parse("w4a4")))
    with torch.no_grad():
        ada.v.fill_(20.0)
    assert float(ada.regulariser(2.0)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        ada.v.fill_(math.log(1.0))  # sigmoid(0) * 1.2 - 0.1 = 0.5
    assert float(ada.regulariser(2.0)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("bits", ["w4a4", "w4a4-tensor-static", "w8a8-tensor-static-sym", "w3a6g16", "w4a16",
                                  "w16a4-tensor-static"])
def test_hard_mode_equals_the_frozen_qlinear_bit_for_bit(bits):
    spec = QuantSpec.parse(bits)
    lin = linear()
    mod = LearnableQLinear(lin, spec, name="layer")
    x = torch.randn(3, 10, 64)
    if mod.act.learnable:
        mod.act.init_from(x.reshape(-1, 64))
    if mod.rounding is not None:
        with torch.no_grad():  # move some rounding decisions away from nearest
            mod.rounding.v.add_(torch.randn_like(mod.rounding.v))
    mod.soft = False
    q = mod.to_qlinear()
    assert isinstance(q, QLinear)
    assert torch.equal(mod(x), q(x))
    if spec.quantizes_weights:
        assert q.codes is not None and int(q.codes.min()) >= q.w_qparams.qmin and int(q.codes.max()) <= q.w_qparams.qmax


def test_learned_rounding_reduces_output_error():
    """Adam steps on V (annealed regulariser, as in the search) lower the layer's output error below
    round-to-nearest. The inputs are correlated across channels: with independent channels the expected error
    sum_i dw_i^2 var(x_i) separates per weight and nearest rounding is already optimal (the AdaRound premise is
    that correlated inputs make it suboptimal)."""
    torch.manual_seed(0)
    spec = QuantSpec.parse("w3a16")
    lin = linear(64, 32)
    x = torch.randn(256, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(256, 64)
    y = lin(x).detach()
    mod = LearnableQLinear(lin, spec)
    mod.soft = False
    before = float((mod(x) - y).square().mean())
    opt = torch.optim.Adam([mod.rounding.v], lr=0.05)
    mod.soft = True
    steps, warm = 150, 30
    for t in range(steps):
        loss = (mod(x) - y).square().mean()
        if t >= warm:
            beta = 2.0 + 18.0 * (1.0 - (t - warm) / (steps - warm))
            loss = loss + 1e-2 * mod.rounding.regulariser(beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mod.soft = False
    after = float((mod(x) - y).square().mean())
    assert after < 0.85 * before


def test_activation_step_sizes_are_never_zero_or_nan():
    spec = QuantSpec.parse("w4a4-tensor-static")
    act = ActQuantizer(spec)
    act.init_from(torch.zeros(100, 8))  # all-zero calibration inputs
    qp = act.qparams()
    assert qp is not None and bool((qp.scale >= MIN_SCALE).all()) and math.isfinite(float(qp.scale))
    assert torch.isfinite(act(torch.randn(4, 8))).all()
    with torch.no_grad():
        act.log_scale.fill_(-1e6)
    act.clamp_()
    assert bool(act.scale() >= MIN_SCALE)  # compared in float32, the dtype the floor is stored in
    with torch.no_grad():
        act.log_scale.fill_(float("nan"))
    act.clamp_()
    assert math.isfinite(float(act.scale())) and bool(act.scale() >= MIN_SCALE)
    # a zero weight row gets a finite positive scale too
    lin = nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight[1].zero_()
    qp_w = init_weight_qparams(lin.weight, QuantSpec.parse("w4a4"))
    assert torch.isfinite(qp_w.scale).all() and bool((qp_w.scale >= MIN_SCALE).all())


def test_lsq_step_size_receives_gradient_and_moves():
    torch.manual_seed(0)
    spec = QuantSpec.parse("w16a3-tensor-static")
    act = ActQuantizer(spec)
    x = torch.randn(512, 16)
    act.init_from(x)
    s0 = float(act.scale())
    loss = (act(x) - x).square().mean()
    loss.backward()
    assert act.log_scale.grad is not None and float(act.log_scale.grad) != 0.0
    assert s0 > 0


def test_options_validation_names_the_fix():
    from qvlm_harness.errors import HarnessError

    assert QVLMOptions.from_dict({"p": "0.25", "max_depth": 2, "weight_mse": "false"}).p == 0.25
    with pytest.raises(HarnessError, match="unknown qvlm option"):
        QVLMOptions.from_dict({"depth": 3})
    with pytest.raises(HarnessError, match="p must be in"):
        QVLMOptions.from_dict({"p": 1.5})
    with pytest.raises(HarnessError, match="expects an integer"):
        QVLMOptions.from_dict({"max_depth": 2.5})
    assert not QVLMOptions(eta=0.0).visual_optimisation
    assert QVLMOptions(eta=0.1).visual_optimisation


def test_sharpen_keeps_the_hard_decisions_and_sets_soft_offsets():
    lin = linear()
    ada = AdaRoundWeight(lin.weight, init_weight_qparams(lin.weight, QuantSpec.parse("w4a4")))
    with torch.no_grad():
        ada.v.add_(torch.randn_like(ada.v))
    codes = ada.codes().clone()
    ada.sharpen_(0.6)
    assert torch.equal(ada.codes(), codes)
    h = ada.h().detach()
    up = ada.v.detach() >= 0
    assert torch.allclose(h[up], torch.full_like(h[up], 0.6), atol=1e-6)
    assert torch.allclose(h[~up], torch.full_like(h[~up], 0.4), atol=1e-6)


def test_flip_inverts_exactly_the_masked_decisions_and_probe_gradient_is_first_order():
    """`flip_` moves each masked code by one step (up <-> down, inside the grid) and nothing else; flipping twice
    restores the codes; the probe's gradient predicts the loss change of a flip to first order (the loss is
    linear in the weight here, so exactly)."""
    lin = linear()
    ada = AdaRoundWeight(lin.weight, init_weight_qparams(lin.weight, QuantSpec.parse("w4a16")))
    codes0 = ada.codes().clone()
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(ada.v.shape, generator=gen) < 0.1
    up0 = ada.hard_offset().bool()
    ada.flip_(mask)
    assert torch.equal(ada.hard_offset().bool(), up0 ^ mask)
    moved = (ada.codes() - codes0).abs()
    assert moved[~mask.reshape(moved.shape)].sum() == 0 and moved.max() <= 1 and moved.sum() > 0
    ada.flip_(mask)
    assert torch.equal(ada.codes(), codes0)
    # first-order prediction of the change of a linear loss <c, W_hard> equals the real change
    c = torch.randn(ada.shape, generator=gen)
    ada.probe = ada.hard_offset().requires_grad_(True)
    (c * ada.hard_weight()).sum().backward()
    gain = (ada.probe.grad * (1 - 2 * ada.probe.detach()) * ada.flippable())[mask].sum()
    ada.probe = None
    before = float((c * ada.hard_weight()).sum())
    ada.flip_(mask)
    # a flip that the grid's edge clamps to the same code changes nothing: `flippable` says which do
    assert float((c * ada.hard_weight()).sum()) - before == pytest.approx(float(gain), rel=1e-4, abs=1e-4)
