"""Q-VLM's fast block search computes what the reference formulation computes: the fused soft weight's gradient
(regulariser folded in) against plain autograd, a fused search step against the reference step, bfloat16 against
float32 on the tiny model, the compiled kernel against eager, inputs captured once per stack, and the paper preset."""

from __future__ import annotations

import copy

import pytest
import torch

from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.methods.qvlm import QVLM
from qvlm_harness.methods.qvlm import method as qvlm_method
from qvlm_harness.methods.qvlm.options import PAPER, QVLMOptions
from qvlm_harness.methods.qvlm.quantizers import LearnableQLinear, soft_round_fn, soft_round_parts
from qvlm_harness.methods.qvlm.search import BlockSearch, restore_units
from qvlm_harness.methods.qvlm.units import build_batches, capture_stack_inputs, find_units, unit_outputs
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.tasks.sqa import ScienceQA


@pytest.fixture(scope="module")
def calib():
    return CalibrationSet.from_task(ScienceQA(), 8, seed=0)


@pytest.fixture(scope="module")
def lm_block(tiny_model_dir, calib):
    """(adapter, the tiny LM's two units, their inputs, FP targets); every test puts the float linears back."""
    a = LlavaAdapter.load(tiny_model_dir)
    a.model.requires_grad_(False)
    batches = build_batches(a, calib, 2)
    units = find_units(a.model)
    inputs = capture_stack_inputs(a.model, batches, ["lm"], units)["lm"]
    block = units["lm"]
    targets = {si.batch: unit_outputs(block, si.hidden, si) for si in inputs}
    return a, block, inputs, targets


def _module(bits: str, seed: int = 0) -> LearnableQLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 48)
    mod = LearnableQLinear(lin, QuantSpec.parse(bits), name="layer")
    with torch.no_grad():  # spread the offsets over the whole rectified-sigmoid range, saturated ends included
        mod.rounding.v.copy_(torch.randn_like(mod.rounding.v) * 4)
    return mod


@pytest.mark.parametrize("bits", ["w4a4", "w3a16g16", "w4a16-wasym", "w2a16"])
@pytest.mark.parametrize("beta", [None, 20.0, 7.5, 2.0])
def test_fused_soft_weight_gradient_equals_autograd_of_the_reference(bits, beta):
    """Loss = <R, W~(V)> + c * sum(1 - |2h - 1|^beta): V's gradient through the fused form (regulariser gradient
    folded into the backward) equals plain autograd through `soft_weight` + `regulariser`, to float32 round-off
    (relative 1e-5); the forward values are equal to 1e-6."""
    mod = _module(bits)
    r = mod.rounding
    proj = torch.randn(r.shape)
    coef = 0.01 / r.v.numel()

    r.v.grad = None
    w_ref = r.soft_weight()
    loss = (w_ref * proj).sum()
    if beta is not None:
        loss = loss + 0.01 * r.regulariser(beta)  # the mean, as the search weights it: coef = 0.01 / numel
    loss.backward()
    g_ref = r.v.grad.clone()

    r.v.grad = None
    r.reg = None if beta is None else torch.tensor([coef, beta])
    w_fused = r.fused_soft_weight()
    (w_fused * proj).sum().backward()
    r.reg = None
    assert torch.allclose(w_fused, w_ref, atol=1e-6)
    scale = float(g_ref.abs().max())
    assert torch.allclose(r.v.grad, g_ref, rtol=1e-5, atol=1e-6 * scale)
    assert float(g_ref.abs().sum()) > 0


@pytest.mark.parametrize("bits", ["w4a4", "w4a8-tensor-static"])
@pytest.mark.parametrize("beta", [None, 12.0])
def test_fused_block_step_gradient_equals_the_reference_step(lm_block, bits, beta):
    """One search step on the tiny LM's two-unit block, from the same state and batch: the gradient of every
    rounding offset V (and LSQ step size) through the fused form equals the reference formulation's (autograd soft
    weights + the regulariser's graph), float32, to 1e-5 of the largest gradient entry."""
    _, block, inputs, targets = lm_block
    opts = QVLMOptions(iters=0, search_dtype="fp32", compile="off", round_weight=0.05)
    s = BlockSearch(block, [1.0, 2.0], QuantSpec.parse(bits), opts, seed=0)
    s.run(inputs, targets)
    with torch.no_grad():  # a state away from the initialisation, as mid-search
        for m in s.wrapped.values():
            m.rounding.v.add_(torch.randn_like(m.rounding.v))
    params = [p for m in s.wrapped.values() for p in m.parameters() if p.requires_grad]
    grads = []
    for fused in (False, True):
        s.fused = fused
        s.train_mode(True)
        for p in params:
            p.grad = None
        with torch.enable_grad():
            s.step_loss(inputs[1], targets[inputs[1].batch], beta).backward()
        grads.append([p.grad.clone() for p in params])
        s.train_mode(False)
    restore_units(block, s.wrapped)
    for ref, fused in zip(*grads, strict=True):
        scale = float(ref.abs().max())
        assert scale > 0 and torch.allclose(fused, ref, rtol=1e-5, atol=1e-5 * scale)


def test_fused_search_steps_keep_the_reference_rounding(lm_block):
    """Ten steps (regulariser from step 2) fused and reference: the same hard rounding decisions except where
    Adam amplifies round-off in near-zero gradients (under 0.5% of the variables) and V within 2 * lr * steps."""
    _, block, inputs, targets = lm_block
    opts = QVLMOptions(iters=0, search_dtype="fp32", compile="off", round_weight=0.05)
    ends = []
    for fused in (False, True):
        s = BlockSearch(block, [1.0, 2.0], QuantSpec.parse("w4a4"), opts, seed=0, fused=fused)
        s.run(inputs, targets)
        s._optimise(inputs, targets, 10, [m.rounding.v for m in s.wrapped.values()], [])
        ends.append(torch.cat([m.rounding.v.detach().flatten() for m in s.wrapped.values()]))
        restore_units(block, s.wrapped)
    ref, fused = ends
    assert float((ref - fused).abs().max()) <= 2 * opts.lr_round * 10
    assert float(((ref >= 0) != (fused >= 0)).float().mean()) < 0.005


def test_bf16_search_reaches_the_float32_objective(lm_block):
    """The block search with bfloat16 matrix products lowers the (float32, hard-rounding) block loss as much as the
    float32 search does. One search's result varies by +-6% of the start with the seeded batch order on the tiny
    model, more than bfloat16 moves it, so the comparison is over four seeds: the mean final/initial loss ratio of
    bfloat16 is within 0.03 of float32's (measured: 0.877 vs 0.871), every search ends below its start. (Measured
    on the default model's blocks too, README Q-VLM section.)"""
    _, block, inputs, targets = lm_block
    spec = QuantSpec.parse("w4a4")
    ratios: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for dtype, out in ratios.items():
        for seed in range(4):
            s = BlockSearch(block, [1.0, 2.0], spec, QVLMOptions(iters=30, lr_round=5e-2, search_dtype=dtype), seed)
            r = s.run(inputs, targets)
            restore_units(block, s.wrapped)
            out.append(r.loss_after / r.loss_before)
    assert all(r < 1.0 for v in ratios.values() for r in v)
    mean = {k: sum(v) / len(v) for k, v in ratios.items()}
    assert mean["bf16"] <= mean["fp32"] + 0.03, ratios


@pytest.mark.slow  # one torch.compile of the kernel: 20-80 s on the shared 2-core machine
def test_compiled_soft_round_kernel_equals_eager():
    mod = _module("w3a16g16", seed=3)
    r = mod.rounding
    reg = torch.tensor([1e-3, 9.0])
    eager = soft_round_parts(r.v.detach(), r.fz, r.zp, r.scale, r.bounds, reg)
    compiled = soft_round_fn(True)(r.v.detach(), r.fz, r.zp, r.scale, r.bounds, reg)
    for a, b in zip(eager, compiled, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_stack_inputs_are_captured_once_per_stack(tiny_model_dir, calib, monkeypatch):
    """The FP pass captures every stack's inputs once; the vision stack (nothing quantized before it) searches on
    that capture, the projector and the LM capture their quantized-prefix inputs once each: 3 captures, not 4."""
    calls = []
    real = qvlm_method.capture_stack_inputs

    def counting(model, batches, stacks, units):
        calls.append(tuple(stacks))
        return real(model, batches, stacks, units)

    monkeypatch.setattr(qvlm_method, "capture_stack_inputs", counting)
    a = LlavaAdapter.load(tiny_model_dir)
    QVLM(iters=1).quantize(a, calib, QuantSpec.parse("w4a4"))
    assert calls == [("vision", "projector", "lm"), ("projector",), ("lm",)]


def test_paper_preset_fills_the_budget_and_explicit_options_win():
    paper = QVLM(preset="paper").config
    assert {k: getattr(paper, k) for k in PAPER} == PAPER
    assert paper.iters == 2000 and paper.eta == 0.01 and paper.ve_steps == 200 and paper.visual_optimisation
    mixed = QVLM(preset="paper", iters="50", eta="0").config
    assert mixed.iters == 50 and mixed.eta == 0.0 and mixed.ve_steps == 200
    # the canonical config (a cell's identity) records the resolved budget, and rebuilds from it
    d = paper.to_dict()
    assert d["preset"] == "paper" and d["iters"] == 2000 and d["eta"] == 0.01
    assert QVLMOptions.from_options({k: v for k, v in d.items() if k != "version"}) == paper
    assert paper.canonical() != mixed.canonical() != QVLM().config.canonical()
    assert mixed.changed() == {"preset": "paper", "iters": 50, "eta": 0.0}
    assert "[preset paper]" in QVLM(preset="paper").describe(QuantSpec.parse("w4a4"))
    with pytest.raises(HarnessError, match="preset expects one of none, paper"):
        QVLM(preset="papr")


def test_paper_preset_cells_are_identified_by_the_resolved_budget(tiny_model_dir, tmp_path):
    from qvlm_harness.config import RunSpec
    from qvlm_harness.plan import make_plan

    def cell_id(options):
        spec = RunSpec(methods=["qvlm"], tasks=["sqa"], bits=[QuantSpec.parse("w4a4")], model=str(tiny_model_dir),
                       output=tmp_path, method_options={"qvlm": options})
        plan = make_plan(spec)
        return plan.cell_id(plan.cells[0])

    paper = cell_id({"preset": "paper"})
    assert paper == cell_id({"preset": "paper", "iters": "2000"}) != cell_id({})
    assert cell_id({"preset": "paper", "iters": "100"}) != paper


def test_options_for_the_fast_path():
    opts = QVLMOptions()
    assert opts.search_dtype == "bf16" and opts.compile == "auto"
    assert not opts.compiles(8) and opts.compiles(2000)
    assert QVLMOptions(compile="on").compiles(1) and not QVLMOptions(compile="off").compiles(5000)
    with pytest.raises(HarnessError, match="search_dtype"):
        QVLMOptions.from_options({"search_dtype": "fp16"})
    assert copy.deepcopy(opts) == opts
