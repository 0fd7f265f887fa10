"""Packed formats, the exact integer GEMM, the zero-point epilogue and the conversion (plain torch backend).

References are independent: numpy int64 matmuls for the integer parts, float64 products of the dequantized
tensors for the epilogue, and the fake-quant `QLinear` the packed module replaces.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.actquant import quantize_activations
from qvlm_harness.kernels.convert import conversion_blocker, convert_to_packed, pack_qlinear
from qvlm_harness.kernels.gemm import CUDA_RULE, int_mm
from qvlm_harness.kernels.linear import IntLinear, WeightOnlyLinear
from qvlm_harness.kernels.packing import (
    code_centre,
    pack_codes,
    pack_int4,
    padded_width,
    storage_format,
    unpack_int4,
)
from qvlm_harness.measure import weight_bytes
from qvlm_harness.quant import QLinear, QParams
from qvlm_harness.quant.quantizer import per_tensor_qparams, per_token_qparams, qrange, quantize

ODD_WIDTHS = [1, 5, 31, 63, 64, 65, 127, 129, 200]


def np_int_matmul(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return a.numpy().astype(np.int64) @ b.numpy().astype(np.int64)


# -- packing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", ODD_WIDTHS)
def test_int4_round_trip_odd_widths(k):
    g = torch.Generator().manual_seed(k)
    v = torch.randint(-8, 8, (3, k), generator=g, dtype=torch.int8)
    p = pack_int4(v)
    assert p.dtype == torch.uint8 and p.shape == (3, padded_width(k) // 2)
    assert torch.equal(unpack_int4(p, k), v)


def test_int4_layout_is_block_interleaved():
    """Byte b of a 64-value block holds value b (low nibble) and value b + 32 (high nibble), each stored + 8."""
    v = (torch.arange(64) % 16 - 8).to(torch.int8)
    p = pack_int4(v[None])[0]
    for b in (0, 7, 31):
        assert int(p[b]) & 15 == int(v[b]) + 8
        assert int(p[b]) >> 4 == int(v[b + 32]) + 8
    # padding of a short row is value 0 (nibble 8), so it contributes nothing to a dot product
    assert int(pack_int4(torch.tensor([[3]], dtype=torch.int8))[0, 1]) == 0x88


def test_int4_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8]]))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_codes_round_trip_all_bits(bits, symmetric):
    qmin, qmax = qrange(bits, symmetric)
    g = torch.Generator().manual_seed(bits * 2 + symmetric)
    for n, k in [(3, 5), (7, 65), (2, 128)]:
        codes = torch.randint(qmin, qmax + 1, (n, k), generator=g).to(torch.int8 if symmetric else torch.uint8)
        codes[0, 0], codes[-1, -1] = qmin, qmax  # the extremes survive
        packed = pack_codes(codes, bits, symmetric)
        assert packed.fmt == storage_format(bits)
        assert torch.equal(packed.codes(), codes)
        assert torch.equal(packed.centred().to(torch.int16), codes.to(torch.int16) - code_centre(bits, symmetric))
        expected = n * k if bits > 4 else n * padded_width(k) // 2
        assert packed.nbytes == expected


# -- integer GEMM -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 576, 96), (3, 17, 9), (33, 100, 70), (5, 64, 128)])
def test_int_mm_exact_against_numpy(m, k, n):
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    a[0, 0], b[0, 0] = -128, -128  # the extreme product
    out = int_mm(a, b.t())
    assert out.dtype == torch.int32
    assert np.array_equal(out.numpy(), np_int_matmul(a, b.t()))


@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (16, 8, 8), (17, 13, 21)])
def test_int_mm_cuda_padding_rule_is_exact(m, k, n):
    """The CUDA constraints (M > 16, K and N multiples of 8) are met by zero padding: checked on CPU."""
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    out = int_mm(a, b.t(), rule=CUDA_RULE)
    assert out.shape == (m, n)
    assert np.array_equal(out.numpy(), np_int_matmul(a, b.t()))


# -- activation quantization -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_activation_codes_match_harness_quant(bits, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(9, 70) * 4 + 1
    x[3] = 0.0  # an all-zero token
    qa = quantize_activations(x, bits, symmetric, per_token=True)
    ref = per_token_qparams(x, bits, symmetric)
    centre = code_centre(bits, symmetric)
    assert torch.equal(qa.codes.to(torch.int16), quantize(x, ref).to(torch.int16) - centre)
    assert torch.equal(qa.scale, ref.scale)
    assert torch.equal(qa.zero, ref.zero_point - centre)
    per_tensor = quantize_activations(x, bits, symmetric, per_token=False)
    ref_t = per_tensor_qparams(x, bits, symmetric)
    assert torch.equal(per_tensor.codes.to(torch.int16), quantize(x, ref_t).to(torch.int16) - centre)


# -- the epilogue: zero points and scales ------------------------------------------------------------------------


def _int_linear(n, k, *, w_bits, w_sym, a_bits, a_sym, group=None, per_token=True, seed=0, static=None):
    """An IntLinear from random codes plus the float64 dequantized weight it represents."""
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange(w_bits, w_sym)
    codes = torch.randint(qmin, qmax + 1, (n, k), generator=g)
    groups = 1 if group is None else k // group
    scale = torch.rand(n, groups, generator=g) * 0.1 + 0.01
    zero = torch.zeros(n, groups, dtype=torch.int32) if w_sym else torch.randint(qmin, qmax + 1, (n, groups),
                                                                                generator=g, dtype=torch.int32)
    bias = torch.randn(n, generator=g)
    zc = None if w_sym else zero - code_centre(w_bits, False)
    packed = pack_codes(codes.to(torch.int8 if w_sym else torch.uint8), w_bits, w_sym)
    mod = IntLinear(packed, scale, zc, bias, group_size=group, a_bits=a_bits, a_symmetric=a_sym,
                    a_per_token=per_token, a_scale=None if static is None else static.scale,
                    a_zero=None if static is None else static.zero_point, backend="torch")
    rep = 1 if group is None else group
    w = (codes.double() - zero.double().repeat_interleave(rep, 1)) * scale.double().repeat_interleave(rep, 1)
    return mod, w, bias.double()


@pytest.mark.parametrize("w_sym,a_sym", [(True, False), (False, False), (False, True), (True, True)])
@pytest.mark.parametrize("group", [None, 32])
def test_zero_point_correction_matches_dequantized_product(w_sym, a_sym, group):
    """y = s_x s_w (x_q W_q^T - z_x rowsum(W_q) - z_w rowsum(x_q) + K z_x z_w) equals the float64 product of the
    dequantized activations and weights."""
    mod, w, bias = _int_linear(24, 96, w_bits=4, w_sym=w_sym, a_bits=8, a_sym=a_sym, group=group)
    x = torch.randn(5, 96) * 2 + 0.7
    qp = per_token_qparams(x, 8, a_sym)
    x_hat = (quantize(x, qp).double() - qp.zero_point.double()) * qp.scale.double()
    ref = x_hat @ w.t() + bias
    y = mod(x).double()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_zero_point_correction_is_exact_in_integers():
    """With unit scales the corrected int32 accumulator is the exact sum of (x_q - z_x)(w_q - z_w)."""
    mod, _, _ = _int_linear(8, 64, w_bits=8, w_sym=False, a_bits=8, a_sym=False, seed=3)
    xq = torch.randint(-128, 128, (4, 64), dtype=torch.int8)
    zx = torch.randint(-128, 128, (4, 1), dtype=torch.int32)
    acc = mod._corrected(int_mm(xq, mod.weight_codes().t()), xq, zx, 0, 64)
    assert mod.w_zero is not None
    ref = (xq.numpy().astype(np.int64) - zx.numpy()) @ (
        mod.weight_codes().numpy().astype(np.int64) - mod.w_zero.numpy()).T
    assert np.array_equal(acc.numpy(), ref)


def test_static_per_tensor_activations():
    static = QParams(torch.tensor(0.05), torch.tensor(100, dtype=torch.int32), 8, False)
    mod, w, bias = _int_linear(16, 64, w_bits=8, w_sym=True, a_bits=8, a_sym=False, per_token=False,
                               static=static)
    x = torch.randn(3, 64)
    x_hat = (quantize(x, static).double() - 100) * 0.05
    ref = x_hat @ w.t() + bias
    assert torch.allclose(mod(x).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# -- packed vs fake-quant, module level ------------------------------------------------------------------------

SPECS = ["w8a8", "w6a6", "w4a4", "w4a8", "w3a3", "w4a4-sym", "w8a8-wasym", "w4a4-wasym", "w4a4g32",
         "w8a8g32-wasym", "w8a8-tensor-dynamic"]


@pytest.mark.parametrize("tag", SPECS)
def test_packed_matches_fake_quant_module(tag):
    spec = QuantSpec.parse(tag)
    torch.manual_seed(0)
    q = QLinear.from_linear(nn.Linear(128, 48), spec, name="layer")
    x = torch.randn(2, 7, 128) * 3 + 0.5
    ref = q(x)
    packed = pack_qlinear(q, backend="torch")
    assert isinstance(packed, IntLinear)
    y = packed(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("tag", ["w4a16", "w4a16g64", "w4a16-wasym", "w8a16", "w6a16"])
def test_weight_only_matches_fake_quant_module(tag):
    """int4pack computes in bfloat16: agreement within 2% of the output range (int8 storage: float32, tight)."""
    spec = QuantSpec.parse(tag)
    torch.manual_seed(1)
    q = QLinear.from_linear(nn.Linear(192, 64), spec)
    x = torch.randn(5, 192)
    packed = pack_qlinear(q)
    assert isinstance(packed, WeightOnlyLinear)
    tol = 2e-2 if spec.w_bits <= 4 else 1e-5
    ref = q(x)
    assert float((packed(x) - ref).abs().max()) <= tol * float(ref.abs().max())


def test_static_qlinear_converts_with_its_calibrated_range():
    spec = QuantSpec.parse("w8a8-tensor")
    torch.manual_seed(2)
    q = QLinear.from_linear(nn.Linear(64, 32), spec)
    x = torch.randn(6, 64)
    assert conversion_blocker(q) == "static activation range not calibrated"
    q.act_qparams = per_tensor_qparams(x * 0.9, 8, False)
    packed = pack_qlinear(q, backend="torch")
    assert packed.a_scale is not None
    assert float((packed(x) - q(x)).abs().max()) <= 1e-5 * float(q(x).abs().max())


# -- conversion of whole models -----------------------------------------------------------------------------------


class LowRankWrapper(nn.Module):
    """Stands in for a wrapper such as LoRC: a QLinear child plus float parts of its own."""

    def __init__(self, q: QLinear):
        super().__init__()
        self.inner = q
        self.down = nn.Linear(q.in_features, 2, bias=False)
        self.up = nn.Linear(2, q.out_features, bias=False)

    def forward(self, x):
        return self.inner(x) + self.up(self.down(x))


class CustomQLinear(QLinear):
    def forward(self, x):
        return super().forward(x * 2)


def test_convert_model_reports_what_stays_simulated():
    torch.manual_seed(0)
    w4a4, w16a8 = QuantSpec.parse("w4a4"), QuantSpec.parse("w16a8")
    model = nn.Sequential(
        QLinear.from_linear(nn.Linear(64, 64), w4a4, name="0"),
        LowRankWrapper(QLinear.from_linear(nn.Linear(64, 64), w4a4, name="1.inner")),
        QLinear.from_linear(nn.Linear(64, 64), w16a8, name="2"),
        CustomQLinear.from_linear(nn.Linear(64, 64), w4a4, name="3"),
    )
    x = torch.randn(3, 64)
    ref = model(x)
    report = convert_to_packed(model, backend="torch")
    assert report.converted == ["0", "1.inner"]
    assert set(report.skipped) == {"2", "3"}
    assert "float weights" in report.skipped["2"] and "overrides" in report.skipped["3"]
    assert isinstance(model[0], IntLinear) and isinstance(model[1].inner, IntLinear)
    assert isinstance(model[2], QLinear) and isinstance(model[3], QLinear)
    assert float((model(x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert "left simulated" in report.summary()


def test_packed_storage_bytes_are_real():
    """int4 codes take half a byte (padded to whole 64-value blocks), plus float32 scales and int32 row sums."""
    torch.manual_seed(0)
    model = nn.Sequential(QLinear.from_linear(nn.Linear(576, 1536, bias=False), QuantSpec.parse("w4a4")))
    fake_packed_estimate = weight_bytes(model, packed=True)
    convert_to_packed(model, backend="torch")
    held = sum(b.numel() * b.element_size() for b in model.buffers())
    assert weight_bytes(model, packed=False) == weight_bytes(model, packed=True) == held
    assert held == 1536 * 576 // 2 + 1536 * 4 + 1536 * 4
    fp16 = 1536 * 576 * 2
    assert fp16 / held > 3.85
    assert held <= fake_packed_estimate * 1.03  # the simulated estimate (fp16 scales, no row sums) is within 3%


def test_w8a8_storage_is_one_byte_per_weight():
    torch.manual_seed(0)
    model = nn.Sequential(QLinear.from_linear(nn.Linear(96, 40), QuantSpec.parse("w6a6")))
    convert_to_packed(model, backend="torch")
    assert model[0].qweight.dtype == torch.int8
    assert weight_bytes(model, packed=False) == 40 * 96 + 40 * 4 * 2 + 40 * 4  # codes, scale, rowsum, bias


# -- the tiny Llava end to end --------------------------------------------------------------------------------------


def _quantized_tiny(tiny_model_dir, tag: str):
    from qvlm_harness.methods.rtn import RTN
    from qvlm_harness.models.llava import LlavaAdapter

    adapter = LlavaAdapter.load(tiny_model_dir)
    RTN().quantize(adapter, None, QuantSpec.parse(tag))
    return adapter


def _requests(n: int = 4):
    from PIL import Image

    from qvlm_harness.task import Request

    out = []
    for i in range(n):
        img = Image.new("RGB", (32, 32), ((40 * i) % 256, (90 + 30 * i) % 256, (200 - 25 * i) % 256))
        out.append(Request(sample_id=str(i), prompt=f"<image>\nWhat color is shape {i}?", image=img,
                           max_new_tokens=5))
    return out


@pytest.mark.parametrize("tag", ["w8a8", "w4a4"])
def test_tiny_llava_packed_matches_fake_quant(tiny_model_dir, tag):
    """End to end on the tiny Llava.

    Tolerance: at 8 bits the logits agree to 1e-5 of their range. At 4 bits the float32 results differ in the
    last bits (different summation order), which now and then moves an activation across a rounding boundary
    of the next layer's coarse 4-bit grid; such flips cascade, so there the packed model must stay within a
    quarter of the fake-quant model's own distance from the float model (relative Frobenius norm of the logits)
    and agree on >= 90% of next-token argmaxes. Greedy outputs must be equal on all but one prompt.
    """
    import copy

    from qvlm_harness.models.llava import LlavaAdapter

    adapter = _quantized_tiny(tiny_model_dir, tag)
    requests = _requests()
    batch = adapter.encode(requests)
    with torch.inference_mode():
        fake_logits = adapter.model(**batch).logits
        float_logits = LlavaAdapter.load(tiny_model_dir).model(**batch).logits
    fake_text = [r.text for r in adapter.generate(requests)]
    packed = copy.copy(adapter)
    packed.model = copy.deepcopy(adapter.model)
    report = convert_to_packed(packed.model, backend="torch")
    assert report.complete and report.kinds == {"IntLinear": len(report.converted)}
    with torch.inference_mode():
        packed_logits = packed.model(**batch).logits
    if tag == "w4a4":
        quant_error = float((fake_logits - float_logits).norm() / float_logits.norm())
        packed_error = float((packed_logits - fake_logits).norm() / fake_logits.norm())
        assert packed_error <= 0.25 * quant_error
        agree = (packed_logits.argmax(-1) == fake_logits.argmax(-1)).float().mean()
        assert float(agree) >= 0.9
    else:
        assert float((packed_logits - fake_logits).abs().max()) <= 1e-5 * float(fake_logits.abs().max())
    packed_text = [r.text for r in packed.generate(requests)]
    same = sum(a == b for a, b in zip(fake_text, packed_text, strict=True))
    assert same >= len(requests) - 1
    assert weight_bytes(packed.model, packed=False) < weight_bytes(adapter.model, packed=False)


@pytest.mark.parametrize("tag", ["w8a8", "w4a4"])
def test_lorc_wrapper_inner_layer_is_packed(tag):
    """ZeroQuant-V2's LoRC wrapper: its inner QLinear is packed, and the low-rank path still sees the same
    quantized input (IntLinear.quantize_input equals QLinear.quantize_input)."""
    from qvlm_harness.quant.lorc import LoRCLinear, lorc_factors

    torch.manual_seed(4)
    lin = nn.Linear(128, 64)
    q = QLinear.from_linear(lin, QuantSpec.parse(tag), name="0")
    U, V = lorc_factors(lin.weight.detach() - q.weight, 8)
    model = nn.Sequential(LoRCLinear(q, U, V, 8, name="0"))
    x = torch.randn(5, 128)
    ref = model(x)
    q_in = q.quantize_input(x)
    report = convert_to_packed(model, backend="torch")
    assert report.converted == ["0.qlinear"] and report.wrappers == {"0": "LoRCLinear"} and not report.skipped
    assert torch.equal(model[0].qlinear.quantize_input(x), q_in)
    assert float((model(x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


# -- the fused CPU kernel is optional -----------------------------------------------------------------------------


def _auto_layer(tag: str = "w4a4"):
    torch.manual_seed(6)
    q = QLinear.from_linear(nn.Linear(128, 32), QuantSpec.parse(tag), name="l0")
    return pack_qlinear(q, backend="auto"), pack_qlinear(q, backend="torch")


def test_auto_backend_falls_back_when_disabled(monkeypatch, caplog):
    from qvlm_harness.kernels import cpu as cpu_kernels

    monkeypatch.setenv("QVLM_HARNESS_NO_CPP", "1")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    auto, plain = _auto_layer()
    x = torch.randn(3, 128)
    with caplog.at_level("WARNING", logger="qvlm_harness.kernels"):
        assert auto.resolved_backend(x) == "torch"
        y1, y2 = auto(x), auto(x)
    assert torch.equal(y1, plain(x)) and torch.equal(y2, y1)
    lines = [r.getMessage() for r in caplog.records if r.name == "qvlm_harness.kernels"]
    assert len(lines) == 1 and "QVLM_HARNESS_NO_CPP" in lines[0] and "torch._int_mm" in lines[0]
    cpp = pack_qlinear(QLinear.from_linear(nn.Linear(64, 16), QuantSpec.parse("w8a8")), backend="cpp")
    with pytest.raises(HarnessError, match="'torch' kernel backend"):
        cpp(torch.randn(1, 64))


def test_auto_backend_falls_back_when_the_build_fails(monkeypatch, caplog):
    """No compiler / no ninja: the build raises, `available()` says why, and layers run on torch._int_mm."""
    from qvlm_harness.kernels import cpu as cpu_kernels

    monkeypatch.delenv("QVLM_HARNESS_NO_CPP", raising=False)
    monkeypatch.setattr(cpu_kernels, "_state", {})

    def broken_build() -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "_load", broken_build)
    auto, plain = _auto_layer("w8a8")
    x = torch.randn(2, 128)
    with caplog.at_level("WARNING", logger="qvlm_harness.kernels"):
        y = auto(x)
    assert not cpu_kernels.available() and "Ninja is required" in str(cpu_kernels.unavailable_reason())
    assert torch.equal(y, plain(x))
    lines = [r.getMessage() for r in caplog.records if r.name == "qvlm_harness.kernels"]
    assert len(lines) == 1 and "Ninja is required" in lines[0]


def test_auto_backend_skips_a_kernel_built_without_vnni(monkeypatch, caplog):
    """A CPU without AVX512-VNNI gets the scalar build: exact, but 'auto' prefers torch._int_mm."""
    from qvlm_harness.kernels import cpu as cpu_kernels

    monkeypatch.delenv("QVLM_HARNESS_NO_CPP", raising=False)
    monkeypatch.setattr(cpu_kernels, "_state", {"ok": True, "vnni": False})
    with caplog.at_level("WARNING", logger="qvlm_harness.kernels"):
        assert not cpu_kernels.auto_uses_cpp()
    assert any("AVX512-VNNI" in r.getMessage() for r in caplog.records)


# -- every method that produces QLinear modules converts ------------------------------------------------------------


@pytest.mark.parametrize("method", ["rtn", "smoothquant", *(pytest.param(m, marks=pytest.mark.slow)
                                                            for m in ("awq", "gptq", "zeroquant-v2"))])
def test_every_qlinear_method_converts_and_agrees(tiny_model_dir, method):
    """Each registered baseline's W8A8 tiny Llava packs completely (LoRC wrappers keep their float factors).

    Layer by layer, on the very inputs the fake-quant model feeds it, each packed layer equals its QLinear to
    float32 rounding (1e-5 of the output range). End to end the tiny float differences now and then move an
    activation across an 8-bit rounding boundary downstream, so there the packed model must stay within a
    quarter of the fake-quant model's own distance from the float model and agree on >= 90% of argmaxes.
    """
    import copy

    from qvlm_harness import plugins
    from qvlm_harness.calibration import CalibrationSet
    from qvlm_harness.models.llava import LlavaAdapter

    spec = QuantSpec.parse("w8a8")
    adapter = LlavaAdapter.load(tiny_model_dir)
    batch = adapter.encode(_requests(2))
    with torch.inference_mode():
        float_logits = adapter.model(**batch).logits
    m = plugins.methods.get(method)()
    calib = CalibrationSet.from_task(plugins.tasks.get("sqa")(), 2, 0) if m.needs_calibration(spec) else None
    torch.manual_seed(0)
    qm = m.quantize(adapter, calib, spec, ("vision", "projector", "lm"))
    assert qm.execution == "simulated"
    packed = copy.deepcopy(adapter.model)
    report = convert_to_packed(packed, backend="torch")
    assert report.complete, report.summary()
    assert len(report.converted) == len(qm.quantized_modules)
    layer_err: list[float] = []

    def compare(mod, inp, out):
        y = packed.get_submodule(mod.name if mod.name in report.converted else mod.name + ".qlinear")(inp[0])
        layer_err.append(float((y - out).abs().max()) / float(out.abs().max()))

    hooks = [mod.register_forward_hook(compare) for mod in adapter.model.modules() if isinstance(mod, QLinear)]
    with torch.inference_mode():
        ref = adapter.model(**batch).logits
        got = packed(**batch).logits
    for h in hooks:
        h.remove()
    assert len(layer_err) == len(report.converted) and max(layer_err) <= 1e-5
    quant_error = float((ref - float_logits).norm() / float_logits.norm())
    assert float((got - ref).norm() / ref.norm()) <= 0.25 * quant_error
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9
