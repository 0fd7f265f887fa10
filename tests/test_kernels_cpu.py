"""The fused CPU kernel (`harness/kernels/csrc/int_linear.cpp`): exact integer results and agreement.

Compiling it takes about a minute once per machine (then it is cached), so on a machine where it is not built yet
these tests are marked slow (the separate slow CI step builds and runs them); where it is built they run in the
fast suite.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels import cpu as cpu_kernels
from qvlm_harness.kernels.convert import convert_to_packed, pack_qlinear
from qvlm_harness.kernels.linear import IntLinear
from qvlm_harness.kernels.packing import code_centre, pack_codes
from qvlm_harness.quant import QLinear
from qvlm_harness.quant.quantizer import qrange

pytestmark = [] if cpu_kernels.is_built() else [pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def fused_kernel():
    if not cpu_kernels.available():
        pytest.skip(f"fused CPU kernel unavailable: {cpu_kernels.unavailable_reason()}")


def _unit_scale_layer(n, k, *, w_bits, w_sym, group, a_zero, seed, a_sym=False):
    """IntLinear with unit weight scales and a static unit activation scale: its float output is an integer."""
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange(w_bits, w_sym)
    codes = torch.randint(qmin, qmax + 1, (n, k), generator=g)
    groups = 1 if group is None else k // group
    zero = None if w_sym else torch.randint(qmin, qmax + 1, (n, groups), generator=g, dtype=torch.int32)
    packed = pack_codes(codes.to(torch.int8 if w_sym else torch.uint8), w_bits, w_sym)
    zc = None if zero is None else zero - code_centre(w_bits, False)
    mod = IntLinear(packed, torch.ones(n, groups), zc, None, group_size=group, a_bits=8, a_symmetric=a_sym,
                    a_per_token=False, a_scale=torch.tensor(1.0), a_zero=torch.tensor(0 if a_sym else a_zero),
                    backend="cpp")
    rep = 1 if group is None else group
    w = codes.numpy().astype(np.int64) - (0 if zero is None else zero.numpy().repeat(rep, 1).astype(np.int64))
    return mod, w


@pytest.mark.parametrize("m", [1, 3, 5, 7, 8, 9, 40])  # VNNI kernel row tiles (m <= 8) and the oneDNN path (> 8)
@pytest.mark.parametrize("w_bits,w_sym,group", [(8, True, None), (8, False, None), (4, True, None),
                                                (4, False, None), (4, True, 64), (8, False, 64), (4, True, 32)])
@pytest.mark.parametrize("k", [64, 200])
def test_fused_kernel_is_exact_in_integers(m, w_bits, w_sym, group, k):
    """Integer inputs with unit scales: the output must equal a numpy int64 matmul exactly."""
    if group is not None and k % group:
        pytest.skip("group does not divide K")
    a_zero = 37
    mod, w = _unit_scale_layer(24, k, w_bits=w_bits, w_sym=w_sym, group=group, a_zero=a_zero, seed=m + k)
    g = torch.Generator().manual_seed(k * m)
    codes = torch.randint(0, 256, (m, k), generator=g)
    codes[0, 0], codes[-1, -1] = 0, 255
    x = (codes - a_zero).float()  # x / 1 + 37 rounds to the codes exactly
    y = mod(x)
    ref = (codes.numpy().astype(np.int64) - a_zero) @ w.T
    assert np.abs(ref).max() < 2**24  # exactly representable in float32
    assert np.array_equal(y.numpy().astype(np.int64), ref)


def test_fused_kernel_symmetric_activations_exact():
    mod, w = _unit_scale_layer(16, 128, w_bits=4, w_sym=True, group=None, a_zero=0, seed=1, a_sym=True)
    x = torch.randint(-127, 128, (6, 128)).float()
    assert np.array_equal(mod(x).numpy().astype(np.int64), x.numpy().astype(np.int64) @ w.T)


SPECS = ["w8a8", "w6a6", "w4a4", "w4a8", "w3a3", "w4a4-sym", "w8a8-wasym", "w4a4-wasym", "w4a4g64", "w4a4g32",
         "w8a8-tensor-dynamic"]


@pytest.mark.parametrize("tag", SPECS)
@pytest.mark.parametrize("m", [1, 6, 33])
def test_fused_kernel_matches_fake_quant_and_torch_path(tag, m):
    """Same activation codes and the same epilogue operation order as the torch path, so the two backends agree
    bit for bit, and both agree with the fake-quant QLinear to float32 rounding."""
    spec = QuantSpec.parse(tag)
    torch.manual_seed(m)
    q = QLinear.from_linear(nn.Linear(192, 80), spec)
    x = torch.randn(m, 192) * 2 + 0.3
    ref = q(x)
    fused = pack_qlinear(q, backend="cpp")(x)
    plain = pack_qlinear(q, backend="torch")(x)
    span = float(ref.abs().max())
    assert float((fused - ref).abs().max()) <= 1e-5 * span
    assert torch.equal(fused, plain)


def test_fused_kernel_rejects_nan():
    q = QLinear.from_linear(nn.Linear(64, 16), QuantSpec.parse("w8a8"), name="l0")
    x = torch.randn(2, 64)
    x[1, 3] = float("nan")
    with pytest.raises(HarnessError, match="NaN or inf"):
        pack_qlinear(q, backend="cpp")(x)


def test_fused_kernel_handles_bf16_and_3d_inputs():
    q = QLinear.from_linear(nn.Linear(64, 32), QuantSpec.parse("w4a4"))
    x = torch.randn(2, 3, 64)
    layer = pack_qlinear(q, backend="cpp")
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 32)
    assert float((y.float() - layer(x)).abs().max()) <= 0.05 * float(layer(x).abs().max())


@pytest.mark.parametrize("tag", ["w8a8", "w4a4"])
def test_tiny_llava_fused_matches_torch_backend(tiny_model_dir, tag):
    """The whole tiny Llava on the fused kernel equals the plain-torch packed model bit for bit: same integer
    codes, and the epilogue's float operations run in the same order."""
    from qvlm_harness.methods.rtn import RTN
    from qvlm_harness.models.llava import LlavaAdapter

    adapter = LlavaAdapter.load(tiny_model_dir)
    RTN().quantize(adapter, None, QuantSpec.parse(tag))
    convert_to_packed(adapter.model, backend="torch")
    fused = copy.deepcopy(adapter.model)
    for mod in fused.modules():
        if isinstance(mod, IntLinear):
            mod.backend = "cpp"
    from qvlm_harness.task import Request

    batch = adapter.encode([Request(sample_id="0", prompt="Which color is it?", image=None)])
    with torch.inference_mode():
        a = adapter.model(**batch).logits
        b = fused(**batch).logits
    assert torch.equal(a, b)
