"""Activation granularity as an explicit part of every spec (issue 16): the per-input-channel static quantizer
against a brute-force reference, qvlm-official under per-token and qvlm under per-channel activations (so the two
compare under one quantizer), the planner's refusal of channel ranges on packed kernels, unchanged cell ids, and
the Activations column of the tables and of `compare --methods`."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from qvlm_harness.activations import computed_bits, row_activations
from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.convert import conversion_blocker
from qvlm_harness.methods.qvlm_official import OfficialQLinear, QVLMOfficial
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.paired import pair_rows
from qvlm_harness.plan import make_plan
from qvlm_harness.quant import QLinear, calibrate_static_activations, quantize_linears
from qvlm_harness.quantize import quantize
from qvlm_harness.report import main_table, multi_dataset_table, task_table
from qvlm_harness.tasks.sqa import ScienceQA
from tests.report_rows import _row
from tests.test_cli import one_line_error, run_cli


# -- the spec grammar --------------------------------------------------------------------------------------------------
def test_channel_flag_parses_and_existing_tags_keep_their_form():
    spec = QuantSpec.parse("w4a4-channel")
    assert (spec.a_granularity, spec.a_dynamic, spec.tag, spec.activations) == (
        "channel", False, "w4a4-channel-static", "channel-static")
    assert QuantSpec.parse(spec.tag) == spec
    # the forms every stored row and cell id were made with are unchanged
    assert [QuantSpec.parse(t).tag for t in ("w4a4", "w8a8-tensor-static", "w8a8-tensor-dynamic", "w4a16g128")] == [
        "w4a4", "w8a8-tensor-static", "w8a8-tensor-dynamic", "w4a16g128"]
    assert "a_granularity_given" not in QuantSpec.parse("w4a4").to_dict()
    assert QuantSpec.parse("w4a4").to_dict() == {**QuantSpec(4, 4).to_dict()}
    assert [QuantSpec.parse(t).activations for t in ("w4a4", "w8a8-tensor", "w8a8-tensor-dynamic", "w4a16")] == [
        "token-dyn", "tensor-static", "tensor-dyn", "float"]


@pytest.mark.parametrize(("bits", "needle"), [("w4a4-channel-dynamic", "static"), ("w4a16-channel", "a16"),
                                              ("w4a4-token-channel", "contradict")])
def test_bad_channel_specs_are_refused_in_one_line(bits, needle, capsys):
    code, _, err = run_cli(capsys, "validate", "--methods", "rtn", "--tasks", "sqa", "--bits", bits, "--model", "tiny")
    assert code == 2 and needle in one_line_error(err)


def test_spelling_token_out_keeps_the_cell_id_except_where_a_method_defaults_otherwise(tiny_model_dir, tmp_path):
    def ids(method: str, bits: str) -> list[str]:
        plan = make_plan(RunSpec(methods=[method], tasks=["sqa"], bits=QuantSpec.parse_list(bits),
                                 model=str(tiny_model_dir), limit=2, output=tmp_path))
        return [plan.cell_id(c) for c in plan.cells]

    assert ids("rtn", "w4a4-token") == ids("rtn", "w4a4")
    assert len(ids("rtn", "w4a4,w4a4-token")) == 1  # one setting: evaluated once
    official = ids("qvlm-official", "w4a4,w4a4-token,w4a4-channel")
    assert len(set(official)) == 3 and official[0] == ids("qvlm-official", "w4a4")[0]
    assert [i.rsplit("-", 2)[0] for i in official] == ["qvlm-official-w4a4", "qvlm-official-w4a4-token",
                                                       "qvlm-official-w4a4-channel-static"]


# -- the per-input-channel quantizer -----------------------------------------------------------------------------------
def _brute_force_channel_fake_quant(x: np.ndarray, batches: list[np.ndarray], bits: int) -> np.ndarray:
    """Asymmetric uniform quantization with one range per input channel, element by element: the range is the
    channel's min/max over every calibration value, widened to include 0; scale = range / (2^b - 1),
    zero point = round(-min / scale) clamped to the grid."""
    qmax = 2**bits - 1
    flat = [b.reshape(-1, b.shape[-1]) for b in batches]
    out = np.empty_like(x)
    for c in range(x.shape[-1]):
        values = [float(v) for f in flat for v in f[:, c]]
        lo, hi = min(min(values), 0.0), max(max(values), 0.0)
        scale = max((hi - lo) / qmax, 1e-8)
        zero = min(max(round(-lo / scale), 0), qmax)
        for idx in itertools.product(*(range(n) for n in x.shape[:-1])):
            q = min(max(np.round(np.float32(x[idx + (c,)]) / np.float32(scale)) + zero, 0), qmax)
            out[idx + (c,)] = (q - zero) * np.float32(scale)
    return out


def test_per_input_channel_quantizer_matches_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    spec = QuantSpec.parse("w8a4-channel")
    quantize_linears(model, spec)
    batches = [torch.randn(2, 3, 6) * torch.tensor([0.1, 1.0, 5.0, 0.5, 2.0, 20.0]) + 0.3 for _ in range(3)]
    qps = calibrate_static_activations(model, None, lambda: [model(b) for b in batches])
    layer = model[0]
    assert isinstance(layer, QLinear) and layer.a_scale is not None and tuple(layer.a_scale.shape) == (6,)
    assert tuple(qps["0"].scale.shape) == (6,)
    x = torch.randn(2, 4, 6) * 3
    got = layer.quantize_input(x).numpy()
    ref = _brute_force_channel_fake_quant(x.numpy(), [b.numpy() for b in batches], 4)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    per_tensor = QuantSpec.parse("w8a4-tensor")  # not the same thing: one range for all six channels
    assert not np.allclose(got, _per_tensor(x, batches, per_tensor), atol=1e-3)
    assert conversion_blocker(layer) is not None and "reduction dim" in conversion_blocker(layer)


def _per_tensor(x, batches, spec) -> np.ndarray:
    model = nn.Sequential(nn.Linear(6, 5))
    quantize_linears(model, spec)
    calibrate_static_activations(model, None, lambda: [model(b) for b in batches], observer="minmax")
    return model[0].quantize_input(x).numpy()


def test_a_per_tensor_range_is_refused_on_a_per_channel_layer():
    layer = QLinear.from_linear(nn.Linear(6, 5), QuantSpec.parse("w8a4-channel"))
    from qvlm_harness.quant import compute_qparams

    with pytest.raises(ValueError, match="per input channel"):
        layer.act_qparams = compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), 4, False)


# -- methods -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib():
    return CalibrationSet.from_task(ScienceQA(), 12, seed=0)


def _per_token_reference(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row of the flattened input: its own min/max (with 0), asymmetric uniform grid."""
    rows = x.reshape(-1, x.shape[-1]).double()
    lo = torch.clamp(rows.min(dim=1, keepdim=True).values, max=0)
    hi = torch.clamp(rows.max(dim=1, keepdim=True).values, min=0)
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(rows / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(x.shape).float()


def test_qvlm_official_runs_with_per_token_activations(tiny_model_dir, calib):
    method = QVLMOfficial()
    spec = method.canonical_spec(QuantSpec.parse("w4a4-token"))
    assert spec.tag == "w4a4-token" and not method.needs_calibration(spec)
    assert "per-token" in method.describe(spec) and "not the released one" in method.describe(spec)
    adapter = LlavaAdapter.load(tiny_model_dir)
    qm = quantize(adapter, method, spec, None, measure_fp_pass=False)
    mods = [m for m in adapter.model.modules() if isinstance(m, OfficialQLinear)]
    assert mods and {m.kind for m in mods} == {"token"} and qm.report["activations"] == "token-dyn"
    torch.manual_seed(1)
    x = torch.randn(2, 7, mods[0].in_features) * 4
    got = mods[0].quantize_input(x)
    assert torch.allclose(got, _per_token_reference(x, 4), atol=1e-5)
    assert not torch.allclose(got, x)
    answers = adapter.generate(calib.requests[:2], batch_size=2)
    assert len(answers) == 2
    # the bare bit-width is still the released per-input-channel quantizer, and says so
    released = method.computed_spec(QuantSpec.parse("w4a4"))
    assert released.activations == "channel-static" and method.needs_calibration(QuantSpec.parse("w4a4"))
    assert "reduction dim" in method.describe(QuantSpec.parse("w4a4"))
    assert "per-tensor" in method.supports(QuantSpec.parse("w4a4-tensor"))


def test_qvlm_official_bare_and_channel_specs_run_the_released_quantizer(tiny_model_dir, calib):
    outs = []
    for bits in ("w4a4", "w4a4-channel"):
        adapter = LlavaAdapter.load(tiny_model_dir)
        method = QVLMOfficial(n_calib=2, n_search=1)
        spec = method.canonical_spec(QuantSpec.parse(bits))
        qm = quantize(adapter, method, spec, calib, measure_fp_pass=False)
        mods = [m for m in adapter.model.modules() if isinstance(m, OfficialQLinear)]
        assert {m.kind for m in mods} == {"channel"} and qm.report["activations"] == "channel-static"
        with torch.inference_mode():
            outs.append(adapter.model(**adapter.encode(calib.requests[:2])).logits)
    assert torch.equal(outs[0], outs[1])


def test_qvlm_runs_with_per_input_channel_activations(tiny_model_dir, calib):
    from qvlm_harness import plugins

    method = plugins.methods.get("qvlm")(iters=1, eval_batches=1, act_tokens=32)
    spec = QuantSpec.parse("w4a4-channel")
    assert "per-input-channel" in method.describe(spec) and "reduction dim" in method.describe(spec)
    adapter = LlavaAdapter.load(tiny_model_dir)
    quantize(adapter, method, spec, calib, measure_fp_pass=False)
    qls = [m for m in adapter.model.modules() if isinstance(m, QLinear)]
    assert qls and all(m.a_granularity == "channel" for m in qls)
    assert all(m.a_scale is not None and tuple(m.a_scale.shape) == (m.in_features,) for m in qls)
    assert any(len(torch.unique(m.a_scale)) > 1 for m in qls)  # one learned step per channel, not one per tensor
    with torch.inference_mode():
        logits = adapter.model(**adapter.encode(calib.requests[:2])).logits
    assert torch.isfinite(logits).all()


# -- the planner -------------------------------------------------------------------------------------------------------
def test_planner_refuses_channel_activations_on_packed_kernels(tiny_model_dir, tmp_path, capsys):
    args = ["--methods", "rtn", "--tasks", "sqa", "--model", str(tiny_model_dir), "--output", str(tmp_path)]
    code, _, err = run_cli(capsys, "run", *args, "--bits", "w4a4-channel", "--execution", "packed")
    line = one_line_error(err)
    assert code == 2 and "--execution packed" in line and "integer GEMM" in line and "--execution simulated" in line
    assert not (tmp_path / "harness.db").exists()  # refused before any work
    code, _, err = run_cli(capsys, "validate", *args, "--bits", "w4a4-channel", "--execution", "simulated")
    assert code == 0, err


def test_a_method_whose_default_is_per_channel_stays_simulated_under_packed(tiny_model_dir, tmp_path):
    plan = make_plan(RunSpec(methods=["qvlm-official", "rtn"], tasks=["sqa"], bits=[QuantSpec.parse("w4a4")],
                             model=str(tiny_model_dir), output=tmp_path, execution="packed"))
    assert {(c.method, c.bits) for c in plan.cells} == {("qvlm-official", "w4a4"), ("rtn", "w4a4")}
    assert any("stays simulated" in n and "channel-static" in n for n in plan.notes)


# -- tables and comparisons --------------------------------------------------------------------------------------------
def _rows():
    cost = dict(prefill=1.0, decode=None, stored=1.0, packed=1.0)
    rows = [_row("qvlm", "w4a4", "sqa", "simulated", {"acc": 41.0}, **cost),
            _row("qvlm", "w4a4-channel-static", "sqa", "simulated", {"acc": 50.0}, **cost),
            _row("qvlm-official", "w4a4", "sqa", "simulated", {"acc": 52.0}, **cost),  # stored before: no record
            _row("qvlm-official", "w4a4-token", "sqa", "simulated", {"acc": 40.0}, **cost),
            _row("rtn", "w8a8-tensor-static", "sqa", "simulated", {"acc": 60.0}, **cost),
            _row("fp32", "fp", "sqa", "float", {"acc": 72.0}, **cost)]
    rows[3].settings["activations"] = "token-dyn"
    return rows


def test_every_results_table_names_the_activation_quantizer():
    rows = _rows()
    expected = {("qvlm", "W4A4"): "token-dyn", ("qvlm", "W4A4-CHANNEL-STATIC"): "channel-static",
                ("qvlm-official", "W4A4"): "channel-static", ("qvlm-official", "W4A4-TOKEN"): "token-dyn",
                ("rtn", "W8A8-TENSOR-STATIC"): "tensor-static", ("fp32", "FP"): "float"}
    for table in (main_table(rows), task_table(rows, "sqa"), multi_dataset_table(rows)):
        assert list(table.columns[:4]) == ["Method", "Bits", "Activations", "Exec"]
        assert dict(zip(zip(table["Method"], table["Bits"], strict=True), table["Activations"],
                        strict=True)) == expected


def test_compare_methods_pairs_rows_computed_with_the_same_quantizer():
    rows = _rows()
    pairs = pair_rows(rows, "qvlm", "qvlm-official")
    assert sorted((a.bits, b.bits) for a, b in pairs) == [("w4a4", "w4a4-token"), ("w4a4-channel-static", "w4a4")]
    assert all(row_activations(a) == row_activations(b) for a, b in pairs)
    assert computed_bits(rows[2]) == "w4a4-channel-static" and computed_bits(rows[3]) == "w4a4"


def test_run_report_and_compare_show_the_activations(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", str(tiny_model_dir), "--tasks", "sqa", "--limit", "3", "--max-new-tokens", "2",
              "--output", str(out), "--no-progress", "--calib-samples", "4"]
    code, text, err = run_cli(capsys, "run", "--methods", "qvlm-official", "--bits", "w4a4-token,w4a4",
                              "--method-option", "qvlm-official.n_calib=2", *common)
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", "--methods", "rtn", "--bits", "w4a4", *common)
    assert code == 0, err
    code, report, err = run_cli(capsys, "report", "--output", str(out), "--all", "--no-plots")
    assert code == 0, err
    cells = {tuple(c.strip() for c in line.split("|")[1:4]) for line in report.splitlines()
             if line.startswith(("| qvlm-official", "| rtn"))}
    assert {("qvlm-official", "W4A4-TOKEN", "token-dyn"), ("qvlm-official", "W4A4", "channel-static"),
            ("rtn", "W4A4", "token-dyn")} <= cells
    code, comparison, err = run_cli(capsys, "compare", "--output", str(out), "--methods", "rtn,qvlm-official")
    assert code == 0, err
    assert "Activations" in comparison and "token-dyn" in comparison and "w4a4 / w4a4-token" in comparison


def test_rotated_and_plain_rows_of_one_method_are_told_apart_by_compare_and_the_regression_selection():
    """`harness run --rotate` rows carry their rotation: `compare --methods qvlm+hadamard,qvlm` pairs the rotated
    row with the plain one, and the newest-row selection keeps both instead of letting one replace the other."""
    cost = dict(prefill=1.0, decode=None, stored=1.0, packed=1.0)
    plain = _row("qvlm", "w4a4", "sqa", "simulated", {"acc": 41.0}, **cost)
    rotated = _row("qvlm", "w4a4", "sqa", "simulated", {"acc": 55.0}, **cost)
    rotated.settings = dict(rotated.settings, rotate="hadamard")
    rotated.cell_id += "-rot"
    assert (plain.method_label, rotated.method_label) == ("qvlm", "qvlm+hadamard")
    (a, b), = pair_rows([plain, rotated], "qvlm+hadamard", "qvlm")
    assert (a.metrics["acc"], b.metrics["acc"]) == (55.0, 41.0)
    with pytest.raises(HarnessError, match="qvlm\\+random"):
        pair_rows([plain, rotated], "qvlm+random", "qvlm")


def test_store_selection_keeps_a_rotated_row_beside_the_plain_one(tmp_path):
    from qvlm_harness.regression import select_rows
    from qvlm_harness.store import Store

    cost = dict(prefill=1.0, decode=None, stored=1.0, packed=1.0)
    plain = _row("rtn", "w4a4", "sqa", "simulated", {"acc": 3.0}, **cost)
    rotated = _row("rtn", "w4a4", "sqa", "simulated", {"acc": 7.0}, **cost)
    rotated.settings = dict(rotated.settings, rotate="hadamard")
    rotated.cell_id += "-rot"
    store = Store(tmp_path / "h.db")
    store.put(plain)
    store.put(rotated)
    assert sorted(r.method_label for r in select_rows(store)) == ["rtn", "rtn+hadamard"]
