"""The device helpers and the CUDA-specific layouts, checked on the CPU (the `cuda` tests run them on a GPU).

The CUDA branches of `timer` / `PeakDeviceMemory` are driven through a recording stand-in for ``torch.cuda`` (the
order of synchronise, record and read is what makes a GPU timing right); the int8 GEMM padding is checked against
an exact integer reference; the tinygemm byte order against the layout the CUDA kernel's source documents.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from torch import nn

from qvlm_harness import device as dev
from qvlm_harness.kernels.gemm import CUDA_RULE, _exact_float64_mm, int_mm
from qvlm_harness.kernels.int4pack import cuda_int4pack_blocker, inner_k_tiles, tinygemm_bytes, tinygemm_nibbles


# -- timing and memory ---------------------------------------------------------------------------------------------
def test_cpu_timer_brackets_the_block():
    t0 = time.perf_counter()
    with dev.timer("cpu") as t:
        time.sleep(0.02)
    outer = time.perf_counter() - t0
    assert t.clock == "perf_counter"
    assert 0.02 <= t.seconds <= outer


class FakeCuda:
    """Records the calls `timer` / `PeakDeviceMemory` make on ``torch.cuda``."""

    def __init__(self):
        self.calls: list[str] = []
        self.peak = 0
        fake = self

        class Event:
            def __init__(self, enable_timing: bool = False):
                assert enable_timing
                self.name = "start" if not any(c.startswith("event") for c in fake.calls) else "end"
                fake.calls.append(f"event {self.name}")

            def record(self):
                fake.calls.append(f"record {self.name}")

            def synchronize(self):
                fake.calls.append(f"synchronize {self.name}")

            def elapsed_time(self, other):
                fake.calls.append("elapsed_time")
                return 1234.5  # milliseconds

        self.Event = Event

    def synchronize(self, device=None):
        self.calls.append("synchronize device")

    def reset_peak_memory_stats(self, device=None):
        self.calls.append("reset peak")
        self.peak = 0

    def max_memory_allocated(self, device=None):
        self.calls.append("read peak")
        return self.peak

    def memory_allocated(self, device=None):
        return 3 * 2**20


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("Event", "synchronize", "reset_peak_memory_stats", "max_memory_allocated", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_cuda_timer_synchronises_before_start_and_reads_after_the_end_event(fake_cuda):
    with dev.timer("cuda:0") as t:
        fake_cuda.calls.append("work")
    calls = fake_cuda.calls
    assert calls.index("synchronize device") < calls.index("record start") < calls.index("work")
    assert calls.index("work") < calls.index("record end") < calls.index("synchronize end") < calls.index(
        "elapsed_time")
    assert t.seconds == pytest.approx(1.2345) and t.clock == "cuda events"


def test_peak_memory_is_reset_per_region_and_none_on_cpu(fake_cuda):
    assert dev.peak_memory("cpu") is None and dev.allocated_memory("cpu") is None
    with dev.PeakDeviceMemory("cpu") as cpu:
        pass
    assert cpu.peak_mb is None and cpu.start_mb is None and fake_cuda.calls == []
    fake_cuda.peak = 999 * 2**20  # a previous region's peak: must not leak into the next one
    with dev.PeakDeviceMemory("cuda") as region:
        fake_cuda.peak = 5 * 2**20
    assert fake_cuda.calls.index("reset peak") < fake_cuda.calls.index("read peak")
    assert region.peak_mb == 5 and region.start_mb == 3


# -- torch._int_mm shape rules --------------------------------------------------------------------------------------
def test_int_mm_shape_rule_brute_force():
    """`int_mm_shape_ok` is cuBLASLt's rule (m > 16, k and n multiples of 8) and the padded shape is the smallest
    shape that meets it, component by component (found by counting up)."""
    for m, k, n in itertools.product(range(1, 40, 3), range(1, 30), range(1, 30, 2)):
        assert dev.int_mm_shape_ok(m, k, n) == (m > 16 and k % 8 == 0 and n % 8 == 0)
        mp, kp, np_ = dev.int_mm_padded_shape(m, k, n)
        assert dev.int_mm_shape_ok(mp, kp, np_)
        assert mp == next(x for x in itertools.count(m) if x > 16)
        assert kp == next(x for x in itertools.count(k) if x % 8 == 0)
        assert np_ == next(x for x in itertools.count(n) if x % 8 == 0)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (16, 8, 8), (17, 8, 8), (16, 7, 9), (2, 576, 1536), (33, 65, 31)])
def test_padded_int8_gemm_equals_int32_reference(m, k, n):
    """Padding to the CUDA rule (run here with the CPU kernel) gives exactly the int32 product."""
    g = torch.Generator().manual_seed(m + 7 * k + 31 * n)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    a[0, 0] = b[0, 0] = -128
    mp, kp, np_ = dev.int_mm_padded_shape(m, k, n)
    ap = torch.zeros(mp, kp, dtype=torch.int8)
    bp = torch.zeros(np_, kp, dtype=torch.int8)
    ap[:m, :k], bp[:n, :k] = a, b
    padded = torch._int_mm(ap, bp.t())[:m, :n]
    reference = a.to(torch.int32) @ b.to(torch.int32).t()
    assert torch.equal(padded, reference)
    assert torch.equal(int_mm(a, b.t(), rule=CUDA_RULE), reference)


def test_float64_fallback_is_exact_at_the_extremes():
    """The fallback for a CUDA device without int8 GEMMs: exact even where float32 would round (K = 4096 of
    (-128)^2 sums to 2^26, and mixed signs just below)."""
    a = torch.full((3, 4096), -128, dtype=torch.int8)
    b = torch.full((4096, 5), -128, dtype=torch.int8)
    b[::2, 1] = 127
    a[1, ::3] = 127
    out = _exact_float64_mm(a, b)
    ref = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64)
    assert out.dtype == torch.int32 and np.array_equal(out.numpy(), ref)


# -- tinygemm (CUDA int4) layout ------------------------------------------------------------------------------------
def test_tinygemm_bytes_put_even_columns_in_the_high_nibble():
    nib = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]])
    assert tinygemm_bytes(nib).tolist() == [[0x12, 0x34], [0xF0, 0x0F]]
    g = torch.Generator().manual_seed(0)
    many = torch.randint(0, 16, (24, 64), generator=g)
    assert torch.equal(tinygemm_nibbles(tinygemm_bytes(many)), many.to(torch.int32))


def test_tinygemm_bytes_match_the_kernels_documented_int32_packing():
    """int4mm.cu: from uint8 bytes v[0..3] the kernel packs v3L v2L v1L v0L v3H v2H v1H v0H (high bits first),
    and says this equals packing the int32 values as v7 v5 v3 v1 v6 v4 v2 v0; so bytes built by
    `tinygemm_bytes` from eight values must pack like that."""
    vals = [3, 14, 0, 7, 9, 1, 12, 5]
    v = tinygemm_bytes(torch.tensor([vals]))[0].tolist()
    from_bytes = ((v[3] & 0xF) << 28 | (v[2] & 0xF) << 24 | (v[1] & 0xF) << 20 | (v[0] & 0xF) << 16
                  | (v[3] & 0xF0) << 8 | (v[2] & 0xF0) << 4 | (v[1] & 0xF0) | (v[0] & 0xF0) >> 4)
    order = [7, 5, 3, 1, 6, 4, 2, 0]
    from_ints = 0
    for i in order:
        from_ints = (from_ints << 4) | vals[i]
    assert from_bytes == from_ints


def test_inner_k_tiles_is_the_widest_tile_dividing_k():
    for k in range(16, 1025, 16):
        t = inner_k_tiles(k)
        fits = [x for x in (2, 4, 8) if k % (16 * x) == 0]
        assert t == (max(fits) if fits else None)


def test_weight_only_layer_for_cuda_without_cuda_keeps_packed_codes_and_says_why():
    from qvlm_harness.kernels.linear import WeightOnlyLinear
    from qvlm_harness.kernels.packing import pack_codes

    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA fallback")
    assert "not available" in cuda_int4pack_blocker("cuda")
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-7, 8, (32, 128), generator=g, dtype=torch.int8)
    scale = torch.rand(32, 1, generator=g) + 0.1
    layer = WeightOnlyLinear(pack_codes(codes, 4, True), scale, None, None, group_size=None, device="cuda")
    assert layer.kernel == "dequant" and "CUDA is not available" in layer.kernel_note
    assert "CUDA is not available" in repr(layer)
    x = torch.randn(3, 128, generator=g)
    assert torch.allclose(layer(x), x @ (codes.float() * scale).t(), rtol=1e-5, atol=1e-5)


# -- placement ------------------------------------------------------------------------------------------------------
def test_place_like_leaves_cpu_modules_untouched():
    old, new = nn.Linear(4, 3), nn.Linear(4, 3)
    weight = new.weight
    assert dev.place_like(new, old) is new and new.weight is weight
    assert dev.off_device(new, torch.device("cpu")) == []


def test_place_like_moves_to_the_old_modules_device_and_skips_meta(monkeypatch):
    with torch.device("meta"):
        on_meta, meta_old = nn.Linear(4, 3), nn.Linear(4, 3)
    on_cpu = nn.Linear(4, 3)
    moves: list = []
    for m in (on_meta, on_cpu):
        monkeypatch.setattr(m, "to", lambda device, m=m: moves.append((m, device)) or m)
    dev.place_like(on_meta, nn.Linear(4, 3))  # the replaced module is on the CPU, the new one elsewhere: moved
    assert moves == [(on_meta, torch.device("cpu"))]
    dev.place_like(on_cpu, meta_old)  # the replaced module is a meta skeleton's: nothing moves there
    assert len(moves) == 1
    assert dev.off_device(meta_old, torch.device("cpu")) == ["weight", "bias"]


def test_swapped_modules_follow_the_replaced_module(tiny_adapter):
    """`set_submodule` (every method's module swap) keeps the CPU model's tensors as they are: no copies."""
    import copy

    from qvlm_harness.config import QuantSpec
    from qvlm_harness.quant.apply import quantize_linears

    model = copy.deepcopy(tiny_adapter.model)
    names = quantize_linears(model, QuantSpec.parse("w4a16"), include="model.language_model")
    assert names and dev.off_device(model, torch.device("cpu")) == []


# -- the commands --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("args, needle", [
    (["bench", "--device", "cuda", "--model", "tiny"], "CUDA is not available"),
    (["bench", "--throughput", "--device", "cuda", "--model", "tiny"], "--throughput measures against this CPU"),
    (["quantize", "--method", "rtn", "--bits", "w8a8", "--model", "tiny", "--device", "cuda"],
     "CUDA is not available"),
])
def test_cuda_flags_are_refused_in_one_line_before_any_model_loads(capsys, tmp_path, args, needle):
    from tests.test_cli import one_line_error, run_cli

    code, _, err = run_cli(capsys, *args, "--output", str(tmp_path / "out"))
    assert code == 2 and needle in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_rows_carry_an_empty_peak_cuda_figure_on_the_cpu(tiny_model_dir, tmp_path):
    from qvlm_harness.config import QuantSpec, RunSpec
    from qvlm_harness.runner import Runner

    spec = RunSpec(methods=["rtn"], tasks=["sqa"], bits=QuantSpec.parse_list("w4a16"), model=str(tiny_model_dir),
                   limit=2, output=tmp_path / "out", batch_size=2, max_new_tokens=2)
    rows = Runner(spec, log=lambda m: None, progress=False).run().rows
    assert rows and all(r.measurements["peak_cuda_mb"] is None and r.measurements["peak_rss_mb"] > 0 for r in rows)


def test_conversion_report_names_why_int4_weights_dequantize_per_call():
    """A group size the int4 kernel lacks (16) keeps packed codes and dequantizes them: the report says so."""
    from qvlm_harness.config import QuantSpec
    from qvlm_harness.kernels.convert import convert_to_packed
    from qvlm_harness.quant.apply import quantize_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    quantize_linears(model, QuantSpec.parse("w4a16g16"))
    report = convert_to_packed(model, backend="torch")
    assert report.complete and [m.kernel for m in model] == ["dequant", "dequant"]
    assert report.kernel_notes == {"group size 16 is none of the int4 kernel's 256, 128, 64, 32": 2}
    assert "dequantized per call" in report.summary() and report.to_dict()["kernel_notes"] == report.kernel_notes


def test_engine_moves_what_a_method_left_elsewhere_and_records_it(monkeypatch):
    """`keep_on_device`: nothing happens when every tensor is on the model's device (the CPU case, and what the
    `cuda` tests require of every method); a stray tensor is moved with the whole model and noted in the report."""
    from types import SimpleNamespace

    from qvlm_harness import quantize as q
    from qvlm_harness.config import QuantSpec
    from qvlm_harness.method import QuantizedModel

    model = nn.Sequential(nn.Linear(4, 3))
    qm = QuantizedModel(SimpleNamespace(model=model), "m", QuantSpec(), "float")
    q.keep_on_device(qm, torch.device("cpu"))
    assert "placement" not in qm.report
    moved: list = []
    monkeypatch.setattr(q, "off_device", lambda m, d: ["0.weight"])
    monkeypatch.setattr(model, "to", lambda d: moved.append(d) or model)
    logs: list[str] = []
    q.keep_on_device(qm, torch.device("cpu"), logs.append)
    assert moved == [torch.device("cpu")] and "0.weight" in qm.report["placement"] and logs
