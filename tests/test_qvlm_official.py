"""`qvlm-official`: NF4 against bitsandbytes, the released activation quantizer, gate and grid, end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.methods.qvlm_official import CalibState, OfficialQLinear, QVLMOfficial, official_fake_quant
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.quant import compute_qparams, fake_quantize
from qvlm_harness.quant.nf4 import nf_quantize
from qvlm_harness.runner import Runner
from qvlm_harness.tasks.sqa import ScienceQA


def test_weights_are_the_shared_nf4_with_double_quantization():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    m = OfficialQLinear(lin, 4, "channel", 1, 1, False, CalibState(), "x")
    ref = nf_quantize(lin.weight, backend="auto").dequantize()
    assert torch.equal(m.weight, ref)
    assert m.nf4.double_quant and m.nf4.blocksize == 64
    assert m.weight_storage_bytes(packed=True) < lin.weight.numel() * 0.6


def test_released_activation_quantizer_is_asymmetric_uniform():
    torch.manual_seed(0)
    x = torch.randn(5, 40, 16)
    lo = torch.minimum(x.amin(dim=(0, 1)), torch.zeros(16))
    hi = torch.maximum(x.amax(dim=(0, 1)), torch.zeros(16))
    got = official_fake_quant(x, lo, hi, 4)
    ref = torch.stack([fake_quantize(x[..., c], compute_qparams(lo[c], hi[c], 4, False)) for c in range(16)], -1)
    scale = (hi - lo) / 15
    assert ((got - ref).abs() <= 1e-5 * scale).float().mean() > 0.999  # identical up to reciprocal rounding
    assert len(torch.unique(got[..., 3])) <= 16
    const = official_fake_quant(torch.ones(3, 4), torch.ones(4), torch.ones(4), 4)  # released code: NaN here
    assert torch.isfinite(const).all()


def _module(block: int, position: int, state: CalibState) -> OfficialQLinear:
    torch.manual_seed(0)
    m = OfficialQLinear(nn.Linear(64, 64), 4, "channel", block, position, False, state, f"b{block}.l{position}")
    m.phase = "calibrate"
    return m


def test_gate_widens_on_first_sample_and_every_third_block_only_when_entropy_is_high():
    state = CalibState()
    gated = _module(2, 3, state)  # block 2: gated by entropy
    always = _module(4, 3, state)  # block 4: 4 % 3 == 1, always widens
    x1 = torch.randn(1, 10, 64)
    gated(x1)
    always(x1)
    assert torch.equal(gated.range_max, torch.maximum(x1.amax(dim=1)[0], torch.zeros(64)))  # first sample: widen
    big = x1 * 10
    state.last_entropy, state.entropies = 0.0, [5.0]  # last entropy below the running mean: gate closed
    before = gated.range_max.clone()
    gated(big)
    assert torch.equal(gated.range_max, before)
    always(big)
    assert torch.equal(always.range_max, torch.maximum(big.amax(dim=1)[0], torch.zeros(64)))
    state.last_entropy, state.entropies = 9.0, [5.0]  # above the mean: gate open
    gated(big)
    assert torch.equal(gated.range_max, always.range_max)


def test_range_shrink_grid_minimises_the_half_power_error():
    state = CalibState()
    m = _module(1, 1, state)
    x = torch.randn(1, 200, 64)
    x[0, 0] *= 40  # an outlier token makes the full range too coarse
    m(x)
    lo, hi = m.range_min.clone(), m.range_max.clone()
    m.phase = "search"
    m(x)
    factors = [1.0 - 0.1 * i for i in range(7)]
    scores = [float((official_fake_quant(x, lo * f, hi * f, 4) - x).abs().pow(0.5).mean()) for f in factors]
    best = factors[min(range(7), key=lambda i: (scores[i], i))]
    assert m.shrink == pytest.approx(best)
    assert torch.allclose(m.range_max, hi * best)
    assert best < 1.0


@pytest.fixture(scope="module")
def calib():
    return CalibrationSet.from_task(ScienceQA(), 14, seed=0)


def test_official_method_end_to_end_is_deterministic_and_leaves_vision_in_float(tiny_model_dir, calib):
    outputs, shrinks = [], []
    for _ in range(2):
        a = LlavaAdapter.load(tiny_model_dir)
        q = QVLMOfficial().quantize(a, calib, QuantSpec.parse("w4a4"))
        lm = list(q.quantized_modules)
        assert lm and all(n.startswith("model.language_model.") for n in lm)
        assert isinstance(a.model.get_submodule("model.multi_modal_projector.linear_1"), nn.Linear)
        assert not any(isinstance(m, OfficialQLinear) for m in a.model.model.vision_tower.modules())
        assert q.report["float_parts"] == ["vision", "projector"]
        assert len(q.report["calibration_ids"]) == 8 and len(q.report["search_ids"]) == 2
        mods = [m for m in a.model.modules() if isinstance(m, OfficialQLinear)]
        assert all(m.dynamic == (m.position in (4, 7)) for m in mods)  # o_proj and down_proj
        assert all(any(m.shrink == pytest.approx(1.0 - 0.1 * i) for i in range(7)) for m in mods)
        assert all(torch.isfinite(m.range_min).all() and torch.isfinite(m.range_max).all() for m in mods)
        outputs.append([r.text for r in a.generate(calib.requests[10:13], batch_size=3)])
        shrinks.append(q.report["shrink"])
    assert outputs[0] == outputs[1] and shrinks[0] == shrinks[1]


def test_unsupported_bits_are_skipped_in_a_grid_and_refused_alone(tiny_model_dir, tmp_path):
    m = QVLMOfficial()
    assert "NF4" in m.supports(QuantSpec.parse("w6a6"))  # supports() gives the reason it cannot
    assert m.supports(QuantSpec.parse("w4a4")) is None and m.supports(QuantSpec.parse("w4a16")) is None
    spec = RunSpec(methods=["rtn", "qvlm-official"], tasks=["sqa"], bits=QuantSpec.parse_list("w6a6,w4a4"),
                   model=str(tiny_model_dir), limit=2, output=tmp_path)
    logs: list[str] = []
    cells = Runner(spec, log=logs.append, progress=False).plan()
    assert {(c.method, c.spec.tag) for c in cells} == {("rtn", "w6a6"), ("rtn", "w4a4"), ("qvlm-official", "w4a4")}
    assert any("skipping" in line and "qvlm-official" in line for line in logs)
    from qvlm_harness.errors import HarnessError

    alone = RunSpec(methods=["qvlm-official"], tasks=["sqa"], bits=[QuantSpec.parse("w6a6")],
                    model=str(tiny_model_dir), output=tmp_path)
    with pytest.raises(HarnessError, match="does not support w6a6"):
        Runner(alone, log=logs.append, progress=False).plan()
