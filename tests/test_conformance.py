"""Conformance of every registered method with the checkpoint and packing contracts, on the tiny Llava.

For each method in the registry and each bit-width of `BITS` it supports: quantize through the one entry point,
save, load, and the loaded model gives bit-identical logits (a padded batch, with and without images), holds only
module types the method declares (`Method.produces`) and is labelled as the result was; where the method says
its output packs (`Method.packs`; per-input-channel activations never do), the loaded model converts completely
to packed kernels and stays within the packed-vs-fake tolerance of tests/test_kernels.py. The cases come from the
registry, so a method registered later is covered without editing this file; `BUDGET` only shrinks searches so the
suite stays fast.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qvlm_harness import plugins
from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.checkpoint import StoredQuantization, load_quantized, quantized_modules, save_quantized
from qvlm_harness.cli import main
from qvlm_harness.config import QuantSpec
from qvlm_harness.kernels.convert import convert_to_packed
from qvlm_harness.manifest import codecs_for
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.quant.codec import codec_of
from qvlm_harness.quantize import quantize

BITS = ("w4a16", "w8a8", "w4a4", "w4a16g32", "w4a4-channel")  # -channel: every method honours it or refuses it
SLOW_BITS = ("w8a8-tensor-static",)  # calibrated static ranges: the MSE range search takes seconds per method
# budgets only (each method's own tests cover it at full size; the contract does not depend on them). zeroquant-v2
# rounds by RTN: GPTQ's rounding is gptq's own case, what zeroquant-v2 adds is the LoRC wrapper around it.
BUDGET = {
    "qvlm": {"iters": 1, "eval_batches": 1, "act_tokens": 16},
    "aespa": {"num_iters": 2, "clip_steps": 4},
    "awq": {"n_grid": 2},
    "zeroquant-v2": {"weights": "rtn"},
    "qvlm-official": {"n_calib": 1, "n_search": 1},
}
SCOPE = ("vision", "projector", "lm")


def _method(name: str):
    return plugins.methods.get(name)(**BUDGET.get(name, {}))


def _quantizing() -> list[str]:
    return [n for n in plugins.methods.names() if not plugins.methods.get(n).fixed_precision]


def _cases(bits: tuple[str, ...] = BITS, marks: tuple = ()) -> list:
    cases = []
    for name in _quantizing():
        method = _method(name)
        cases += [pytest.param(name, tag, id=f"{name}-{tag}", marks=marks) for tag in bits
                  if method.supports(QuantSpec.parse(tag)) is None]
    return cases


@pytest.fixture(scope="module")
def samples():
    """Four ScienceQA train prompts of different lengths; the last has an image."""
    return CalibrationSet.from_task(plugins.tasks.get("sqa")(), 4, 0)


@pytest.fixture(scope="module")
def calibration(samples):
    """Two of them, one text-only and one with an image (qvlm-official's search needs an image after its
    calibration prompt)."""
    keep = (0, 3)
    return CalibrationSet(samples.task, [samples.requests[i] for i in keep], [samples.targets[i] for i in keep],
                          samples.seed)


@pytest.fixture(scope="module")
def batch_requests(samples):
    """Three prompts of different lengths (a left-padded batch), the last with an image."""
    return [samples.requests[i] for i in (0, 1, 3)]


def _logits(adapter, requests) -> torch.Tensor:
    with torch.inference_mode():
        return adapter.model(**adapter.encode(requests)).logits


@pytest.fixture(scope="module")
def float_logits(tiny_model_dir, batch_requests):
    return _logits(LlavaAdapter.load(tiny_model_dir), batch_requests)


def test_every_quantizing_method_is_covered():
    """No registered method drops out of the round-trip cases unnoticed, and each declares saveable types."""
    covered = {p.values[0] for p in _cases()}
    assert covered == set(_quantizing())
    for name in _quantizing():
        cls = plugins.methods.get(name)
        assert cls.produces, f"{name} declares no module types (Method.produces)"
        assert set(codecs_for(cls)) == {codec_of(t).name for t in cls.produces}


@pytest.mark.parametrize("name", [n for n in plugins.methods.names() if plugins.methods.get(n).fixed_precision])
def test_fixed_precision_methods_have_nothing_to_save(name, tiny_model_dir, tmp_path, capsys):
    """fp32/fp16/bf16 quantize nothing: no module types, nothing packs, and `harness quantize` says so."""
    cls = plugins.methods.get(name)
    assert cls.produces == () and not cls.packs
    qm = quantize(LlavaAdapter.load(tiny_model_dir), cls(), QuantSpec())
    assert qm.execution == "float" and quantized_modules(qm.adapter.model) == {}
    code = main(["quantize", "--method", name, "--bits", "w4a16", "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "ck")])
    assert code == 2 and "nothing to save" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize(("name", "tag"), _cases() + _cases(SLOW_BITS, (pytest.mark.slow,)))
def test_quantize_save_load_round_trip(name, tag, tiny_model_dir, calibration, batch_requests, float_logits,
                                       tmp_path):
    method = _method(name)
    spec = QuantSpec.parse(tag)
    adapter = LlavaAdapter.load(tiny_model_dir)
    qm = quantize(adapter, method, spec, calibration if method.needs_calibration(spec) else None, scope=SCOPE,
                  measure_fp_pass=False)
    before = _logits(adapter, batch_requests)
    folder = save_quantized(qm, tmp_path / "ck", describe=method.describe(spec), base_model="tiny",
                            fingerprint="x", scope=SCOPE)
    loaded, manifest = load_quantized(folder)
    assert torch.equal(_logits(loaded, batch_requests), before)

    original = {n: type(m) for n, m in quantized_modules(adapter.model).items()}
    restored = {n: type(m) for n, m in quantized_modules(loaded.model).items()}
    assert restored == original and restored, "the checkpoint holds no quantized module"
    inner = {type(m) for m in loaded.model.modules() if codec_of(m) is not None}
    assert inner <= set(method.produces)
    assert (manifest["method"], manifest["spec"]["tag"], manifest["execution"]) == (name, spec.tag, qm.execution)
    stored = StoredQuantization(manifest, str(folder))
    assert stored.config == method.config and stored.spec == spec

    if method.packs and spec.quantizes_weights and spec.a_granularity != "channel":  # channel scales never pack
        packed = copy.deepcopy(loaded.model)
        report = convert_to_packed(packed, backend="torch")
        assert report.complete, report.summary()
        with torch.inference_mode():
            got = packed(**loaded.encode(batch_requests)).logits
        # tests/test_kernels.py's end-to-end tolerance: within a quarter of the fake-quant model's own distance
        # from the float model, >= 90% equal argmaxes
        quant_error = float((before - float_logits).norm() / float_logits.norm())
        assert float((got - before).norm() / before.norm()) <= 0.25 * quant_error
        assert float((got.argmax(-1) == before.argmax(-1)).float().mean()) >= 0.9
