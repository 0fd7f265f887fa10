"""QLinear, observers, calibration hooks and module swapping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.quant import (
    MinMaxObserver,
    MSEObserver,
    QLinear,
    QParams,
    calibrate_static_activations,
    capture_linear_inputs,
    collect_activation_stats,
    compute_qparams,
    linear_names,
    quantize_linears,
    quantize_weight,
)

# -- independent reference fake-quantizers (plain torch, written from the definitions) -----------------------


def ref_fake_rows(x: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Fake-quantize every row of a 2-D float64 tensor with its own min/max range."""
    out = torch.empty_like(x)
    for r in range(x.shape[0]):
        out[r] = ref_fake_range(x[r], float(x[r].min()), float(x[r].max()), bits, sym)
    return out


def ref_fake_range(x: torch.Tensor, lo: float, hi: float, bits: int, sym: bool) -> torch.Tensor:
    if sym:
        q = 2 ** (bits - 1) - 1
        scale = max(abs(lo), abs(hi)) / q
        return torch.clamp(torch.round(x / scale), -q, q) * scale
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2**bits - 1)
    zp = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 2**bits - 1) - zp) * scale


def ref_weight(w: torch.Tensor, bits: int, sym: bool, group: int | None) -> torch.Tensor:
    w = w.double()
    if group is None:
        return ref_fake_rows(w, bits, sym)
    out, k = w.shape
    return ref_fake_rows(w.reshape(-1, group), bits, sym).reshape(out, k)


def make_linear(k=32, n=16, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


# -- QLinear -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["w4a8", "w8a8", "w4a4g16", "w6a6-sym", "w3a8g8-wasym"])
def test_qlinear_forward_matches_reference(tag):
    spec = QuantSpec.parse(tag)
    lin = make_linear()
    q = QLinear.from_linear(lin, spec)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    w_ref = ref_weight(lin.weight.detach(), spec.w_bits, spec.w_symmetric, spec.w_group_size)
    x_ref = ref_fake_rows(x.reshape(-1, 32).double(), spec.a_bits, spec.a_symmetric).reshape(x.shape)
    y_ref = F.linear(x_ref, w_ref, lin.bias.detach().double())
    y = q(x)
    assert y.shape == (2, 3, 16) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    # the stored buffers are consistent: integer codes in range, weight = dequantized codes
    assert q.codes.dtype == (torch.int8 if spec.w_symmetric else torch.uint8)
    qp = q.w_qparams
    assert int(q.codes.min()) >= qp.qmin and int(q.codes.max()) <= qp.qmax
    torch.testing.assert_close(q.weight.double(), w_ref, atol=1e-6, rtol=1e-6)
    assert "simulated" in repr(q) and f"w{spec.w_bits}" in repr(q)


def test_qlinear_w16a8_keeps_float_weight():
    lin = make_linear()
    q = QLinear.from_linear(lin, QuantSpec.parse("w16a8"))
    assert q.codes is None and q.w_qparams is None
    assert torch.equal(q.weight, lin.weight)
    x = torch.randn(5, 32)
    x_ref = ref_fake_rows(x.double(), 8, False).float()
    torch.testing.assert_close(q(x), F.linear(x_ref, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert not torch.equal(q(x), lin(x))  # activations really are quantized


def test_qlinear_w8a16_leaves_input_float():
    lin = make_linear(bias=False)
    q = QLinear.from_linear(lin, QuantSpec.parse("w8a16"))
    x = torch.randn(4, 32)
    codes, qp = quantize_weight(lin.weight, 8, True)
    assert torch.equal(q.codes, codes)
    w_deq = (codes.double() * qp.scale.double()).float()
    torch.testing.assert_close(q(x), F.linear(x, w_deq), atol=1e-6, rtol=1e-6)
    assert q.bias is None


def test_qlinear_accepts_transformed_weight():
    lin = make_linear()
    new_w = lin.weight.detach() * 2.0
    q = QLinear.from_linear(lin, QuantSpec.parse("w8a16"), weight=new_w)
    torch.testing.assert_close(q.weight.double(), ref_weight(new_w, 8, True, None), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        QLinear.from_linear(lin, QuantSpec.parse("w8a16"), weight=new_w[:, :8])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qlinear_low_precision_inputs(dtype):
    lin = make_linear()
    q = QLinear.from_linear(lin, QuantSpec.parse("w4a8"))
    x = torch.randn(2, 5, 32)
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 5, 16)
    torch.testing.assert_close(y.float(), q(x), atol=0.1, rtol=0.05)
    q_half = QLinear.from_linear(make_linear().to(dtype), QuantSpec.parse("w4a8"))
    assert q_half.weight.dtype == dtype and q_half.w_scale.dtype == torch.float32
    assert q_half(x.to(dtype)).dtype == dtype


def test_qlinear_any_leading_shape():
    q = QLinear.from_linear(make_linear(), QuantSpec.parse("w4a4"))
    x = torch.randn(2, 3, 4, 32)
    torch.testing.assert_close(q(x), q(x.reshape(-1, 32)).reshape(2, 3, 4, 16))
    assert q(torch.randn(32)).shape == (16,)


def test_qlinear_from_codes_round_trip():
    spec = QuantSpec.parse("w4a8g8")
    lin = make_linear()
    q = QLinear.from_linear(lin, spec)
    q2 = QLinear.from_codes(
        q.codes.to(torch.int64), q.w_qparams, lin.bias, spec, in_features=32, out_features=16
    )
    assert torch.equal(q2.codes, q.codes) and q2.codes.dtype == torch.int8
    assert torch.equal(q2.weight, q.weight) and torch.equal(q2.w_scale, q.w_scale)
    x = torch.randn(3, 32)
    assert torch.equal(q2(x), q(x))
    assert q2.w_qparams.group_size == 8
    bad = q.codes.clone().to(torch.int64)
    bad[0, 0] = 8  # outside [-7, 7]
    with pytest.raises(ValueError):
        QLinear.from_codes(bad, q.w_qparams, None, spec)
    with pytest.raises(ValueError):
        QLinear.from_codes(q.codes, q.w_qparams, None, spec, in_features=31)


def test_weight_storage_bytes():
    lin = nn.Linear(128, 64)
    sym = QLinear.from_linear(lin, QuantSpec.parse("w4a16"))
    assert sym.weight_storage_bytes(packed=True) == 4096 + 64 * 2  # codes + fp16 scale per channel
    assert sym.weight_storage_bytes(packed=False) == 64 * 128 * (1 + 4) + 64 * 4 + 64 * 4
    grp = QLinear.from_linear(lin, QuantSpec.parse("w4a16g32-wasym"))
    groups = 64 * 128 // 32
    assert grp.weight_storage_bytes(packed=True) == 4096 + groups * 2 + groups * 4 // 8
    w3 = QLinear.from_linear(nn.Linear(10, 3), QuantSpec.parse("w3a16"))
    assert w3.weight_storage_bytes(packed=True) == 12 + 3 * 2  # ceil(3 * 30 / 8) = 12
    fp = QLinear.from_linear(lin, QuantSpec.parse("w16a8"))
    assert fp.weight_storage_bytes(packed=True) == 64 * 128 * 2
    assert fp.weight_storage_bytes(packed=False) == 64 * 128 * 4


def test_static_activation_uses_observer_qparams():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    spec = QuantSpec.parse("w8a8-tensor-static")
    assert quantize_linears(model, spec, ["2"]) == ["2"]
    q = model[2]
    batches = [torch.randn(4, 16) for _ in range(3)]
    with pytest.raises(HarnessError, match="calibrat"):
        model(batches[0])

    def run():
        for b in batches:
            model(b)

    obs = MinMaxObserver()
    for b in batches:
        obs.update(model[1](model[0](b)))
    result = calibrate_static_activations(model, ["2"], run, observer="minmax")
    expected = obs.qparams(8, False)
    assert torch.equal(q.act_qparams.scale, expected.scale.reshape(()))
    assert torch.equal(q.act_qparams.zero_point, expected.zero_point.reshape(()))
    assert torch.equal(result["2"].scale, expected.scale)
    assert not q.calibrating
    x = torch.randn(5, 16)
    h = model[1](model[0](x))
    lo, hi = float(obs.min), float(obs.max)
    y_ref = F.linear(ref_fake_range(h.double(), lo, hi, 8, False), q.weight.double(), q.bias.double())
    torch.testing.assert_close(model(x).double(), y_ref, atol=1e-5, rtol=1e-5)
    # MSE observer: deterministic and at least as good on its own sample as min/max
    calibrate_static_activations(model, None, run, observer="mse")
    first = q.act_qparams.scale.clone()
    calibrate_static_activations(model, None, run, observer="mse")
    assert torch.equal(first, q.act_qparams.scale)
    assert float(first) <= float(expected.scale) + 1e-12


def test_dynamic_per_tensor_activation():
    lin = make_linear()
    q = QLinear.from_linear(lin, QuantSpec.parse("w16a4-tensor-dynamic"))
    x = torch.randn(3, 32)
    x_ref = ref_fake_range(x.double(), float(x.min()), float(x.max()), 4, False)
    torch.testing.assert_close(
        q(x).double(), F.linear(x_ref, lin.weight.double(), lin.bias.double()), atol=1e-5, rtol=1e-5
    )


# -- observers -----------------------------------------------------------------------------------------------


def sym_err(values: torch.Tensor, qp: QParams) -> float:
    q = qp.qmax
    return float(((torch.clamp(torch.round(values / qp.scale), -q, q) * qp.scale) - values).square().mean())


def test_observers():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(50, 40, generator=g) for _ in range(4)]
    batches[2][3, 3] = 30.0  # a single rare outlier
    mm, mse = MinMaxObserver(), MSEObserver()
    for b in batches:
        mm.update(b)
        mse.update(b)
    allv = torch.cat([b.flatten() for b in batches])
    assert float(mm.min) == float(allv.min()) and float(mm.max) == 30.0
    assert float(mse.hist.sum()) == allv.numel()  # every value counted, memory fixed by `bins`
    assert mse.radius == 32.0
    # 8 bits: clipping the outlier costs more than the resolution it buys -> the search must not over-clip
    qp_mm, qp_mse = mm.qparams(8, True), mse.qparams(8, True)
    assert float(qp_mm.scale) == pytest.approx(30.0 / 127, rel=1e-6)
    assert sym_err(allv, qp_mse) <= sym_err(allv, qp_mm) * 1.02
    # 4 bits: min/max would round almost everything to 0 -> clipping wins clearly
    qp_mm4, qp_mse4 = mm.qparams(4, True), mse.qparams(4, True)
    assert float(qp_mse4.scale) < float(qp_mm4.scale)
    assert sym_err(allv, qp_mse4) < 0.5 * sym_err(allv, qp_mm4)
    # batching does not matter (exact bin merging) and the result is deterministic
    again = MSEObserver()
    again.update(allv[:10])
    again.update(allv[10:])
    assert torch.equal(again.hist, mse.hist)
    assert torch.equal(again.qparams(4, True).scale, qp_mse4.scale)
    with pytest.raises(HarnessError, match="never reached"):
        MinMaxObserver(name="lm.fc1").qparams(8, False)
    bad = MSEObserver(name="lm.fc1")
    bad.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(HarnessError, match="NaN.*lm.fc1"):
        bad.qparams(8, False)
    inf = MSEObserver()
    inf.update(torch.tensor([1.0, float("inf")]))
    with pytest.raises(HarnessError, match="inf"):
        inf.qparams(8, False)


def test_mse_observer_zero_and_positive_data():
    obs = MSEObserver()
    obs.update(torch.zeros(10))
    qp = obs.qparams(8, False)
    assert torch.isfinite(qp.scale) and float(qp.scale) > 0
    relu = MSEObserver()
    relu.update(torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 3)
    qp = relu.qparams(8, False)
    assert int(qp.zero_point) == 0 and float(qp.scale) <= 3 / 255 + 1e-7


# -- calibration capture -------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_capture_matches_manual_hook():
    torch.manual_seed(0)
    model = Tiny()
    xs = [torch.randn(2, 3, 8), torch.randn(1, 5, 8)]
    manual: list[torch.Tensor] = []
    h = model.blocks[1].fc1.register_forward_pre_hook(lambda m, a: manual.append(a[0].reshape(-1, 8)))
    for x in xs:
        model(x)
    h.remove()

    def run():
        for x in xs:
            model(x)

    got = capture_linear_inputs(model, ["blocks.1.fc1", "head"], run)
    assert set(got) == {"blocks.1.fc1", "head"}
    assert got["blocks.1.fc1"].shape == (11, 8) and got["blocks.1.fc1"].dtype == torch.float32
    assert torch.equal(got["blocks.1.fc1"], torch.cat(manual))
    sub = capture_linear_inputs(model, ["blocks.1.fc1"], run, max_tokens=4)["blocks.1.fc1"]
    assert sub.shape == (4, 8)
    assert torch.equal(sub, capture_linear_inputs(model, ["blocks.1.fc1"], run, max_tokens=4)["blocks.1.fc1"])
    full = got["blocks.1.fc1"]
    assert all(any(torch.equal(r, f) for f in full) for r in sub)


def test_capture_removes_hooks_after_exception():
    model = Tiny()

    def run():
        model(torch.randn(2, 8))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        capture_linear_inputs(model, ["blocks.0.fc1", "head"], run)
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    with pytest.raises(HarnessError, match="no module named"):
        capture_linear_inputs(model, ["blocks.9.fc1"], lambda: None)


def test_collect_activation_stats():
    torch.manual_seed(1)
    model = Tiny()
    xs = [torch.randn(3, 8) for _ in range(3)]

    def run():
        for x in xs:
            model(x)

    names = ["blocks.0.fc2", "head"]
    stats = collect_activation_stats(model, names, run)
    inputs = capture_linear_inputs(model, names, run)
    for name in names:
        s, a = stats[name], inputs[name]
        assert s.tokens == a.shape[0] == 9
        torch.testing.assert_close(s.abs_mean, a.abs().mean(0))
        assert torch.equal(s.absmax, a.abs().amax(0))
        assert s.min == float(a.min()) and s.max == float(a.max())
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


# -- module swapping -----------------------------------------------------------------------------------------


def test_quantize_linears_swaps_only_matching_names():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(4, 8)
    ref = model(x)
    assert linear_names(model) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]
    assert linear_names(model, ["blocks.1"]) == ["blocks.1.fc1", "blocks.1.fc2"]
    assert linear_names(model, ["block"]) == []  # prefixes match whole name components
    swapped = quantize_linears(model, QuantSpec(), ["blocks.1", "head"])
    assert swapped == ["blocks.1.fc1", "blocks.1.fc2", "head"]
    assert isinstance(model.blocks[1].fc1, QLinear) and isinstance(model.head, QLinear)
    assert type(model.blocks[0].fc1) is nn.Linear
    assert model.head.name == "head"
    assert torch.equal(model(x), ref)  # w16a16: unchanged outputs
    # a predicate include and a custom factory
    made: list[str] = []

    def make(name, linear):
        made.append(name)
        return QLinear.from_linear(linear, QuantSpec.parse("w8a8"), name=name)

    got = quantize_linears(model, QuantSpec.parse("w8a8"), lambda n, m: n.endswith("fc2"), make=make)
    assert got == made == ["blocks.0.fc2"]  # blocks.1.fc2 is no longer an nn.Linear
    assert model.blocks[0].fc2.a_bits == 8
    out = model(x)
    assert not torch.equal(out, ref) and torch.allclose(out, ref, atol=0.05)


def test_quantize_linears_skips_multihead_attention_internals():
    mha = nn.Sequential(nn.Linear(8, 8))
    mha.add_module("attn", nn.MultiheadAttention(8, 2))
    assert linear_names(mha) == ["0"]
    assert quantize_linears(mha, QuantSpec.parse("w8a8")) == ["0"]
    assert type(mha.attn.out_proj) is not QLinear


def test_calibrate_rejects_non_qlinear():
    model = Tiny()
    with pytest.raises(HarnessError, match="not a quantized linear"):
        calibrate_static_activations(model, ["head"], lambda: None)
    quantize_linears(model, QuantSpec.parse("w8a8-tensor-static"), ["head"])
    with pytest.raises(HarnessError, match="never reached"):
        calibrate_static_activations(model, ["head"], lambda: None)
    assert model.head.act_qparams is None
    qp = compute_qparams(-1.0, 1.0, 8, False)
    model.head.act_qparams = qp
    assert isinstance(model.head.act_qparams, QParams) and model.head.a_scale.shape == ()


def test_qlinear_scales_stay_float32_under_model_cast():
    model = nn.Sequential(nn.Linear(32, 16))
    quantize_linears(model, QuantSpec.parse("w4a8-tensor-static"))
    q = model[0]
    q.act_qparams = compute_qparams(-1.234567, 2.345678, 8, False)
    w_scale, a_scale = q.w_scale.clone(), q.a_scale.clone()
    model.to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.codes.dtype == torch.int8
    assert q.w_scale.dtype == torch.float32 and torch.equal(q.w_scale, w_scale)
    assert q.a_scale.dtype == torch.float32 and torch.equal(q.a_scale, a_scale)
    assert model(torch.randn(3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_shared_linear_swapped_everywhere():
    shared = nn.Linear(8, 8)
    model = nn.Module()
    model.a = shared
    model.b = shared
    assert linear_names(model) == ["a", "b"]
    assert quantize_linears(model, QuantSpec.parse("w8a16")) == ["a", "b"]
    assert isinstance(model.a, QLinear) and model.a is model.b


def test_capture_keyword_input():
    model = Tiny()
    x = torch.randn(3, 8)
    got = capture_linear_inputs(model, ["head"], lambda: model.head(input=x))
    assert torch.equal(got["head"], x)


def test_mse_observer_histogram_exact_under_any_batching():
    g = torch.Generator().manual_seed(3)
    values = torch.cat(
        [torch.randn(500, generator=g) * 3, torch.tensor([1.0, 2.0, -4.0, 0.5, 1e-30, -1e-30])]
    )
    values = torch.cat([values, torch.tensor([64.0, -0.15625, 0.15625])])
    one = MSEObserver(bins=256)
    one.update(values)
    many = MSEObserver(bins=256)
    for chunk in values[values.abs().argsort()].split(7):  # small values first: the radius doubles often
        many.update(chunk)
    assert one.radius == many.radius == 128.0
    assert torch.equal(one.hist, many.hist) and float(one.hist.sum()) == values.numel()
    assert torch.equal(one.qparams(4, False).scale, many.qparams(4, False).scale)
