"""Q-VLM end to end on the tiny random Llava: block search, partition, visual-encoder stage, DED, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.config import QuantSpec
from qvlm_harness.methods.qvlm import QVLM
from qvlm_harness.methods.qvlm.dependency import pair_ded
from qvlm_harness.methods.qvlm.options import QVLMOptions
from qvlm_harness.methods.qvlm.quantizers import LearnableQLinear
from qvlm_harness.methods.qvlm.search import BlockSearch
from qvlm_harness.methods.qvlm.units import build_batches, capture_stack_inputs, find_units, unit_outputs
from qvlm_harness.methods.qvlm.visual import optimise_visual_encoder, tunable_parameters
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.quant import MIN_SCALE, QLinear
from qvlm_harness.tasks.sqa import ScienceQA


@pytest.fixture
def fresh(tiny_model_dir):
    def load() -> LlavaAdapter:
        a = LlavaAdapter.load(tiny_model_dir)
        a.model.requires_grad_(False)
        return a

    return load


@pytest.fixture(scope="module")
def calib():
    return CalibrationSet.from_task(ScienceQA(), 8, seed=0)


def lm_setup(adapter, calib, batch_size=2):
    batches = build_batches(adapter, calib, batch_size)
    units = find_units(adapter.model)
    entries = capture_stack_inputs(adapter.model, batches, ["vision", "lm"], units)
    return batches, units, entries


def test_units_are_found_in_forward_order_with_unused_vision_layers(fresh):
    a = fresh()
    units = find_units(a.model)
    assert [u.name for u in units["lm"]] == [f"model.language_model.layers.{i}" for i in range(2)]
    assert [u.name for u in units["vision"]] == [f"model.vision_tower.encoder.layers.{i}"
                                                 for i in range(2)]
    # vision_feature_layer = -2: the last CLIP layer's output feeds nothing
    assert [u.used for u in units["vision"]] == [True, False]
    assert units["projector"][0].name == "model.multi_modal_projector"


def test_answer_positions_point_at_the_target_tokens(fresh, calib):
    a = fresh()
    batches = build_batches(a, calib, 4)
    eos = a.tokenizer.eos_token_id
    for b in batches:
        ids = b.inputs["input_ids"]
        for i in range(ids.shape[0]):
            pos = b.answer_pos[i].nonzero().flatten()
            assert len(pos) >= 1
            assert int(ids[i, pos[-1] + 1]) == eos and int(pos[-1]) == ids.shape[1] - 2


@pytest.mark.parametrize("bits", ["w4a4", "w4a8-tensor-static"])
def test_block_search_lowers_reconstruction_error_vs_rtn(fresh, calib, bits):
    a = fresh()
    batches, units, entries = lm_setup(a, calib)
    block = units["lm"]
    inputs = entries["lm"]
    targets = {si.batch: unit_outputs(block, si.hidden, si) for si in inputs}
    opts = QVLMOptions(iters=30, lr_round=5e-2)
    search = BlockSearch(block, [1.0, 2.0], QuantSpec.parse(bits), opts, seed=0)
    result = search.run(inputs, targets)
    assert not result.kept_init
    assert result.loss_after < 0.97 * result.loss_before
    assert search.weights == pytest.approx([1 / 3, 2 / 3])
    names = search.finalize()
    assert len(names) == 14 and all(isinstance(a.model.get_submodule(n), QLinear) for n in names)


def test_qvlm_quantizes_every_linear_with_finite_scales_and_reports(fresh, calib):
    a = fresh()
    expected = set(a.linear_names(["vision", "projector", "lm"]))
    assert len(expected) == 28
    method = QVLM(iters=2, max_depth=2)
    q = method.quantize(a, calib, QuantSpec.parse("w4a4-tensor-static"))
    assert set(q.quantized_modules) == expected
    for name in expected:
        m = a.model.get_submodule(name)
        assert isinstance(m, QLinear)
        assert torch.isfinite(m.w_scale).all() and bool((m.w_scale >= MIN_SCALE).all())
        assert m.act_qparams is not None and math.isfinite(float(m.a_scale)) and bool(m.a_scale >= MIN_SCALE)
        # the integer-kernel converter's contract: a plain QLinear with integer codes on its grid, not calibrating
        assert type(m) is QLinear and not m.calibrating and m.w_qparams is not None
        assert not m.codes.is_floating_point()
        assert int(m.codes.min()) >= m.w_qparams.qmin and int(m.codes.max()) <= m.w_qparams.qmax
    r = q.report
    assert q.execution == "simulated"
    for stack, sizes in r["partition"]["block_sizes_after"].items():
        assert all(1 <= s <= 2 for s in sizes), stack
    assert {b["stack"] for b in r["blocks"]} == {"vision", "projector", "lm"}
    assert all(b["loss_after"] <= b["loss_before"] for b in r["blocks"])
    lm_last = [b for b in r["blocks"] if "model.language_model.layers.1" in b["units"]][0]
    assert lm_last["kl_before"] is not None  # auto-regressive guidance on the LM's final block
    assert set(q.search_cost.stages) >= {"capture", "entropy", "search_vision", "search_projector", "search_lm"}
    assert all(v["peak_rss_mb"] > 0 for v in r["search_cost"].values())
    out = a.generate(calib.requests[:2], batch_size=2)
    assert len(out) == 2


def test_scope_leaves_other_parts_in_float(fresh, calib):
    a = fresh()
    q = QVLM(iters=1).quantize(a, calib, QuantSpec.parse("w4a4"), scope=("lm",))
    assert q.quantized_modules and all(n.startswith("model.language_model.") for n in q.quantized_modules)
    assert isinstance(a.model.get_submodule("model.multi_modal_projector.linear_1"), nn.Linear)


def test_same_seed_same_quantized_model(fresh, calib):
    states = []
    for _ in range(2):
        a = fresh()
        QVLM(iters=3, eta=0.05, ve_steps=2).quantize(a, calib, QuantSpec.parse("w4a4"))
        states.append({k: v.clone() for k, v in a.model.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_eta_zero_leaves_the_visual_encoder_unchanged(fresh, calib):
    a = fresh()
    batches = build_batches(a, calib, 1)
    units = find_units(a.model)
    before = {n: p.detach().clone() for n, p in tunable_parameters(a.model, "norms+projector")}
    opts = QVLMOptions(eta=0.0, ve_steps=3, ve_lr=0.1)
    report = optimise_visual_encoder(a.model, batches, units["lm"], QuantSpec.parse("w4a4"), opts, seed=0)
    after = dict(tunable_parameters(a.model, "norms+projector"))
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert report["relative_change"] == 0.0
    assert not any(isinstance(m, LearnableQLinear) for m in a.model.modules())  # the LM is float again
    # with eta > 0 the entropy term moves the encoder
    opts = QVLMOptions(eta=1.0, ve_steps=3, ve_lr=0.01)
    report = optimise_visual_encoder(a.model, batches, units["lm"], QuantSpec.parse("w4a4"), opts, seed=0)
    assert report["relative_change"] > 0
    assert any(not torch.equal(before[n], p) for n, p in tunable_parameters(a.model, "norms+projector"))


def test_eta_zero_pipeline_keeps_encoder_float_parameters_bit_identical(fresh, calib):
    """Through the whole method: with eta = 0 the encoder's non-linear parameters (norms, embeddings) are exactly
    the FP ones, while eta > 0 changes its norms; the report says whether the stage ran."""
    def encoder_state(a):
        return {n: p.detach().clone() for n, p in a.model.model.vision_tower.named_parameters()
                if "norm" in n or "embed" in n}

    ref = encoder_state(fresh())
    a = fresh()
    q = QVLM(iters=1, eta=0.0, ve_steps=3, ve_lr=0.1).quantize(a, calib, QuantSpec.parse("w4a4"))
    got = encoder_state(a)
    assert got.keys() == ref.keys() and all(torch.equal(ref[n], got[n]) for n in ref)
    assert "skipped" in q.report["visual_optimisation"] and "visual_opt" not in q.search_cost.stages
    b = fresh()
    q = QVLM(iters=1, eta=1.0, ve_steps=3, ve_lr=0.05).quantize(b, calib, QuantSpec.parse("w4a4"))
    moved = encoder_state(b)
    assert any(not torch.equal(ref[n], moved[n]) for n in ref)
    assert "visual_opt" in q.search_cost.stages and "entropy_after" in q.search_cost.stages


def test_joint_search_is_never_worse_than_layerwise(fresh, calib):
    a = fresh()
    batches, units, entries = lm_setup(a, calib)
    lm = units["lm"]
    for spec in ("w4a4", "w3a16"):
        res = pair_ded(lm[0], lm[1], entries["lm"], QuantSpec.parse(spec), QVLMOptions(iters=6), seed=0)
        assert res.error_joint <= res.error_layerwise
        assert res.ded >= 0
        if spec == "w3a16":  # the flip search finds a real joint gain (about 40% of the pair error here)
            assert res.error_joint < 0.9 * res.error_layerwise
            assert sum(d > 0 for d in res.sample_ded) >= len(res.sample_ded) // 2
        assert len(res.sample_ded) == len(res.sample_entropy) == len(calib)
    # the model itself was not modified by the analysis
    assert not any(isinstance(m, QLinear | LearnableQLinear) for u in lm for m in u.module.modules())


@pytest.mark.parametrize("bits", ["w4a4", "w4a8-tensor-static"])
def test_saves_and_reloads_with_identical_logits(fresh, calib, tmp_path, bits):
    from qvlm_harness.checkpoint import load_quantized, save_quantized

    a = fresh()
    spec = QuantSpec.parse(bits)
    method = QVLM(iters=2, eta=0.5, ve_steps=2, ve_lr=0.05)  # the encoder norms / projector change too
    qm = method.quantize(a, calib, spec)
    assert qm.report["visual_optimisation"]["relative_change"] > 0
    folder = save_quantized(qm, tmp_path / bits, describe=method.describe(spec), base_model="tiny",
                            fingerprint="x", scope=("vision", "projector", "lm"))
    batch = a.encode(calib.requests[:3])
    with torch.no_grad():
        before = a.model(**batch).logits
    loaded, manifest = load_quantized(folder)
    with torch.no_grad():
        after = loaded.model(**loaded.encode(calib.requests[:3])).logits
    assert torch.equal(before, after)
    assert manifest["method"] == "qvlm" and manifest["report"]["partition"]["after"]
    n = sum(isinstance(m, QLinear) for m in loaded.model.modules())
    assert n == len(qm.quantized_modules) == 28
