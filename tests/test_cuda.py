"""The checks only a GPU can run (marked `cuda`: skipped with "no CUDA device" elsewhere; `pytest -m cuda` or
`tox -e cuda` runs exactly these, and so does scripts/gpu_check.sh).

* integer GEMMs on CUDA (cuBLASLt through `torch._int_mm`, padded to its shape rules) equal an int32 reference;
* `IntLinear` and `WeightOnlyLinear` on CUDA equal the same layers on the CPU (integer part exact; the int4
  kernel computes in bfloat16 on both devices);
* packed-vs-fake agreement for every method whose output packs, on CUDA, as tests/test_kernels.py checks it on
  the CPU;
* device placement of every registered method: quantized on CUDA through the one entry point, every parameter
  and buffer is on CUDA without the engine's correction (`report["placement"]`), and a generation runs;
* bitsandbytes' NF4 kernels on CUDA agree with the harness's bit-identical NF4 path;
* bf16 evaluation equals fp32 within tolerance; `timer` / `PeakDeviceMemory` on a real device.

Sizes are the tiny Llava's: the whole file runs in about a minute on one GPU (most of it model loads).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qvlm_harness import plugins
from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.config import QuantSpec
from qvlm_harness.device import PeakDeviceMemory, int_mm_shape_ok, off_device, timer
from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.convert import convert_to_packed
from qvlm_harness.kernels.gemm import int_mm
from qvlm_harness.kernels.linear import IntLinear, WeightOnlyLinear
from qvlm_harness.kernels.packing import pack_codes
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.quantize import quantize

pytestmark = pytest.mark.cuda

CUDA = "cuda"
# search budgets only (the contract does not depend on them): as tests/test_conformance.py
BUDGET = {
    "qvlm": {"iters": 1, "eval_batches": 1, "act_tokens": 16},
    "aespa": {"num_iters": 2, "clip_steps": 4},
    "awq": {"n_grid": 2},
    "qvlm-official": {"n_calib": 1, "n_search": 1},
}
PLACEMENT_BITS = ("w4a16", "w8a8", "w4a4")


def _method(name: str):
    return plugins.methods.get(name)(**BUDGET.get(name, {}))


def _cases(bits, *, packs_only: bool = False) -> list:
    cases = []
    for name in plugins.methods.names():
        cls = plugins.methods.get(name)
        if cls.fixed_precision or (packs_only and not cls.packs):
            continue
        method = _method(name)
        cases += [pytest.param(name, tag, id=f"{name}-{tag}") for tag in bits
                  if method.supports(QuantSpec.parse(tag)) is None]
    return cases


@pytest.fixture(scope="module")
def calibration():
    """Two ScienceQA train prompts, one with an image (qvlm-official's search needs one)."""
    full = CalibrationSet.from_task(plugins.tasks.get("sqa")(), 4, 0)
    keep = (0, 3)
    return CalibrationSet(full.task, [full.requests[i] for i in keep], [full.targets[i] for i in keep], full.seed)


@pytest.fixture(scope="module")
def requests(calibration):
    return list(calibration.requests)


def _on_cuda(tiny_model_dir, dtype: str = "fp32") -> LlavaAdapter:
    return LlavaAdapter.load(tiny_model_dir, dtype=dtype, device=CUDA)


# -- integer GEMMs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,k,n", [(1, 64, 96), (16, 8, 8), (17, 8, 8), (5, 13, 21), (40, 576, 1536), (1, 7, 3)])
def test_int_mm_on_cuda_equals_int32_reference(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    a[0, 0] = b[0, 0] = -128
    out = int_mm(a.to(CUDA), b.to(CUDA).t())
    assert out.device.type == CUDA and out.shape == (m, n) and out.dtype == torch.int32
    ref = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64).T
    assert np.array_equal(out.cpu().numpy(), ref)


def test_int_mm_rule_shapes_run_unpadded_on_cuda():
    """A shape `int_mm_shape_ok` accepts is what torch._int_mm itself takes on this GPU."""
    assert int_mm_shape_ok(32, 64, 16)
    a = torch.randint(-128, 128, (32, 64), dtype=torch.int8, device=CUDA)
    b = torch.randint(-128, 128, (16, 64), dtype=torch.int8, device=CUDA)
    assert torch.equal(torch._int_mm(a, b.t()).cpu(), a.cpu().to(torch.int32) @ b.cpu().to(torch.int32).t())


@pytest.mark.parametrize("bits,a_bits,group", [(8, 8, None), (4, 4, None), (4, 8, 32), (8, 4, 64)])
@pytest.mark.parametrize("a_symmetric", [True, False])
def test_int_linear_on_cuda_equals_cpu(bits, a_bits, group, a_symmetric):
    g = torch.Generator().manual_seed(bits * 10 + a_bits)
    n, k = 48, 128
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax, qmax + 1, (n, k), generator=g, dtype=torch.int8)
    groups = 1 if group is None else k // group
    scale = torch.rand(n, groups, generator=g) * 0.01 + 0.001
    bias = torch.randn(n, generator=g)
    layers = {d: IntLinear(pack_codes(codes, bits, True), scale, None, bias, group_size=group, a_bits=a_bits,
                           a_symmetric=a_symmetric, a_per_token=True, backend="torch").to(d) for d in ("cpu", CUDA)}
    for m in (1, 3, 20):
        x = torch.randn(m, k, generator=g)
        y_cpu = layers["cpu"](x)
        y_cuda = layers[CUDA](x.to(CUDA))
        assert y_cuda.device.type == CUDA
        assert torch.allclose(y_cuda.cpu(), y_cpu, rtol=1e-5, atol=1e-5 * float(y_cpu.abs().max()))


@pytest.mark.parametrize("group", [None, 32, 128])
def test_int4_weight_only_kernel_on_cuda_equals_cpu(group):
    """`aten._weight_int4pack_mm` (tinygemm) where the GPU has it, else the dequant kernel: the same function as
    the CPU int4pack layer, both computing in bfloat16."""
    g = torch.Generator().manual_seed(group or 1)
    n, k = 40, 256
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    groups = 1 if group is None else k // group
    scale = torch.rand(n, groups, generator=g) * 0.02 + 0.001
    zero = torch.randint(-8, 8, (n, groups), generator=g, dtype=torch.int32)
    packed = pack_codes(codes, 4, False)
    cpu = WeightOnlyLinear(packed, scale, zero, None, group_size=group, device="cpu")
    gpu = WeightOnlyLinear(pack_codes(codes.to(CUDA), 4, False), scale.to(CUDA), zero.to(CUDA), None,
                           group_size=group, device=CUDA)
    assert gpu.qweight.device.type == CUDA
    x = torch.randn(7, k, generator=g)
    y_cpu, y_gpu = cpu(x), gpu(x.to(CUDA)).cpu()
    span = float(y_cpu.abs().max())
    assert float((y_gpu - y_cpu).abs().max()) <= 0.02 * span, gpu.extra_repr()


# -- packed vs fake quant on CUDA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,tag", _cases(("w8a8", "w4a16", "w4a4"), packs_only=True))
def test_packed_matches_fake_quant_on_cuda(tiny_model_dir, calibration, requests, name, tag):
    """As tests/test_kernels.py on the CPU: W8A8 packed equals fake quant to float rounding; where codes sit at
    rounding ties (A4) or the int4 kernel computes in bfloat16 (W4A16), the packed-vs-fake difference stays well
    below the quantization error itself and next-token argmaxes agree."""
    adapter = _on_cuda(tiny_model_dir)
    batch = adapter.encode(requests)
    with torch.inference_mode():
        floating = adapter.model(**batch).logits.float()
    qm = quantize(adapter, _method(name), QuantSpec.parse(tag), calibration, measure_fp_pass=False)
    assert qm.execution == "simulated"
    with torch.inference_mode():
        fake = adapter.model(**batch).logits.float()
    packed = copy.copy(adapter)
    packed.model = copy.deepcopy(adapter.model)
    report = convert_to_packed(packed.model, backend="torch")
    assert report.converted and not report.skipped, report.summary()
    assert off_device(packed.model, torch.device(CUDA)) == []
    with torch.inference_mode():
        real = packed.model(**batch).logits.float()
    packed_error = float((real - fake).norm() / fake.norm())
    quant_error = float((fake - floating).norm() / floating.norm())
    agree = float((real.argmax(-1) == fake.argmax(-1)).float().mean())
    spec = QuantSpec.parse(tag)
    if spec.a_bits <= 4 or not spec.quantizes_activations:
        assert packed_error <= 0.25 * quant_error and agree >= 0.9, (packed_error, quant_error, agree)
    else:
        assert packed_error <= 1e-3 and agree >= 0.99, (packed_error, agree)


# -- placement of every method --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,tag", _cases(PLACEMENT_BITS))
def test_every_method_places_its_model_on_cuda(tiny_model_dir, calibration, requests, name, tag):
    adapter = _on_cuda(tiny_model_dir)
    method = _method(name)
    spec = QuantSpec.parse(tag)
    qm = quantize(adapter, method, spec, calibration if method.needs_calibration(spec) else None,
                  measure_fp_pass=False)
    assert "placement" not in qm.report, qm.report["placement"]  # the method placed its own tensors
    assert off_device(adapter.model, torch.device(CUDA)) == []
    for m in adapter.model.modules():  # caches that are no buffers (bitsandbytes' QuantState)
        bnb = getattr(m, "_bnb", None)
        if bnb is not None:
            assert bnb[0].device.type == CUDA
    out = adapter.generate(requests[:1], batch_size=1)
    assert out[0].new_tokens >= 0 and out[0].prefill_s is not None


def test_qlora_bitsandbytes_nf4_on_cuda_matches_the_harness_path(tiny_model_dir, requests):
    from qvlm_harness.quant.nf4 import bnb_available

    if not bnb_available():
        pytest.skip("bitsandbytes is not installed (pip install 'qvlm-harness[bnb]')")
    spec = QuantSpec.parse("w4a16")
    logits = {}
    for backend in ("harness", "bnb"):
        adapter = _on_cuda(tiny_model_dir)
        method = plugins.methods.get("qlora")(backend=backend)
        if method.supports(spec) is not None:
            pytest.skip(method.supports(spec))
        try:
            qm = quantize(adapter, method, spec, None, measure_fp_pass=False)
        except HarnessError as exc:  # the tiny model's widths may not be multiples of 64
            pytest.skip(f"qlora backend {backend}: {exc}")
        assert qm.execution == ("real" if backend == "bnb" else "simulated")
        with torch.inference_mode():
            logits[backend] = adapter.model(**adapter.encode(requests)).logits.float()
    rel = float((logits["bnb"] - logits["harness"]).norm() / logits["harness"].norm())
    assert rel <= 1e-2, rel


# -- dtypes, timing, memory ------------------------------------------------------------------------------------------
def test_bf16_evaluation_equals_fp32_within_tolerance(tiny_model_dir, requests):
    logits = {}
    for dtype in ("fp32", "bf16"):
        adapter = _on_cuda(tiny_model_dir, dtype)
        with torch.inference_mode():
            logits[dtype] = adapter.model(**adapter.encode(requests)).logits.float()
    rel = float((logits["bf16"] - logits["fp32"]).norm() / logits["fp32"].norm())
    agree = float((logits["bf16"].argmax(-1) == logits["fp32"].argmax(-1)).float().mean())
    assert rel <= 0.05 and agree >= 0.9, (rel, agree)


def test_timer_and_peak_memory_on_a_real_device():
    x = torch.randn(2048, 2048, device=CUDA)
    with PeakDeviceMemory(CUDA) as mem, timer(CUDA) as t:
        for _ in range(5):
            y = x @ x
    assert t.clock == "cuda events" and t.seconds > 0
    assert mem.peak_mb is not None and mem.peak_mb >= mem.start_mb + y.numel() * 4 / 2**20 - 1e-6
    with PeakDeviceMemory(CUDA) as small:
        torch.ones(1, device=CUDA)
    assert small.peak_mb < mem.peak_mb  # reset per region
