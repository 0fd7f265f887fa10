"""Quantized checkpoints loaded straight into packed modules (`load_quantized(packed=True)`) on the tiny Llava.

For every registered method whose output packs (`Method.packs`), at weight-only and weight-activation specs it
supports: the packed model loaded from the checkpoint gives exactly the logits of today's path (load fake-quant,
then `convert_to_packed`), and the same conversion report; while loading, no floating-point tensor shaped like a
quantized layer's weight is ever created (every op recorded through a TorchDispatchMode); the safetensors reader
reads what safetensors reads; a tied embedding / LM head stays one parameter.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from qvlm_harness import plugins
from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.checkpoint import load_quantized, save_quantized
from qvlm_harness.cli import main
from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.convert import convert_to_packed
from qvlm_harness.kernels.linear import IntLinear, PackedLinear, WeightOnlyLinear
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.quant.qlinear import QLinear
from qvlm_harness.quantize import quantize
from qvlm_harness.tensorfile import TensorFile
from tests.test_conformance import BUDGET, SCOPE

BITS = ("w4a16", "w4a4", "w8a8g32")


def _packing() -> list[str]:
    return [n for n in plugins.methods.names() if plugins.methods.get(n).packs]


def _cases() -> list:
    out = []
    for name in _packing():
        method = plugins.methods.get(name)(**BUDGET.get(name, {}))
        out += [pytest.param(name, tag, id=f"{name}-{tag}") for tag in BITS
                if method.supports(QuantSpec.parse(tag)) is None]
    return out


def _save(model_dir, tmp_path, name: str, tag: str, calibration=None):
    method = plugins.methods.get(name)(**BUDGET.get(name, {}))
    spec = QuantSpec.parse(tag)
    qm = quantize(LlavaAdapter.load(model_dir), method, spec, calibration if method.needs_calibration(spec) else None,
                  scope=SCOPE, measure_fp_pass=False)
    return save_quantized(qm, tmp_path / f"{name}-{tag}", describe=method.describe(spec), base_model="tiny",
                          fingerprint="x", scope=SCOPE)


def _logits(adapter, requests) -> torch.Tensor:
    with torch.inference_mode():
        return adapter.model(**adapter.encode(requests)).logits


@pytest.fixture(scope="module")
def calibration():
    samples = CalibrationSet.from_task(plugins.tasks.get("sqa")(), 4, 0)
    return CalibrationSet(samples.task, [samples.requests[i] for i in (0, 3)],
                          [samples.targets[i] for i in (0, 3)], samples.seed)


def test_every_packing_method_is_covered():
    assert {p.values[0] for p in _cases()} == set(_packing()) and len(_packing()) >= 5


@pytest.mark.parametrize(("name", "tag"), _cases())
def test_packed_load_equals_load_then_pack(name, tag, tiny_model_dir, calibration, tmp_path):
    folder = _save(tiny_model_dir, tmp_path, name, tag, calibration)
    requests = calibration.requests
    fake, _ = load_quantized(folder)
    then_packed = copy.deepcopy(fake.model)
    expected_report = convert_to_packed(then_packed, backend="torch").to_dict()
    direct, _ = load_quantized(folder, packed=True, backend="torch")
    assert not any(isinstance(m, QLinear) for m in direct.model.modules())
    assert {type(m) for m in direct.model.modules() if isinstance(m, PackedLinear)} <= {IntLinear, WeightOnlyLinear}
    got_report = convert_to_packed(direct.model, backend="torch").to_dict()  # nothing left to convert
    assert got_report == expected_report and got_report["converted"] > 0
    with torch.inference_mode():
        want = then_packed(**fake.encode(requests)).logits
    assert torch.equal(_logits(direct, requests), want)
    # every tensor the packed modules hold equals the converted model's (names, dtypes, values)
    a, b = then_packed.state_dict(), direct.model.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


class _Allocations(TorchDispatchMode):
    """Every tensor any op produces while active: (shape, dtype, device)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], torch.dtype, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((tuple(t.shape), t.dtype, t.device.type))
        return out


@pytest.mark.parametrize("tag", ["w4a4", "w4a16"])
def test_no_float_weight_of_a_quantized_layer_is_made(tag, tiny_model_dir, tmp_path):
    folder = _save(tiny_model_dir, tmp_path, "rtn", tag)
    fake, manifest = load_quantized(folder)
    shapes = {(e["meta"]["out"], e["meta"]["in"]) for e in manifest["modules"].values()}
    assert len(shapes) >= 3
    with _Allocations() as counted:
        load_quantized(folder, packed=True, backend="torch")
    real_float = {s for s, dtype, dev in counted.seen if dtype.is_floating_point and dev != "meta"}
    assert counted.seen and not (real_float & shapes), sorted(real_float & shapes)
    # the reference path does make them: the check can fail
    with _Allocations() as reference:
        load_quantized(folder)
    assert {s for s, dtype, dev in reference.seen if dtype.is_floating_point and dev != "meta"} & shapes


def test_tensor_file_reads_what_safetensors_reads(tiny_model_dir, tmp_path):
    folder = _save(tiny_model_dir, tmp_path, "rtn", "w4a4")
    path = folder / "model.safetensors"
    want = load_file(str(path))
    f = TensorFile(path)
    assert set(f.keys()) == set(want)
    for key, t in want.items():
        got = f.read(key)
        assert got.dtype == t.dtype and torch.equal(got, t)
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    (tmp_path / "short.safetensors").write_bytes(raw[:header_end + 16])  # the header, almost no data
    with pytest.raises(HarnessError, match="truncated or corrupt"):
        TensorFile(tmp_path / "short.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(raw[:header_end - 5])  # the header itself cut
    with pytest.raises(HarnessError, match="not a readable safetensors file"):
        TensorFile(tmp_path / "cut.safetensors")


def test_tied_embedding_and_head_stay_one_parameter(tiny_model_dir, tmp_path, calibration):
    tied_dir = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, tied_dir)
    adapter = LlavaAdapter.load(tied_dir)
    adapter.model.config.tie_word_embeddings = True
    adapter.model.config.text_config.tie_word_embeddings = True
    adapter.model.lm_head.weight = adapter.model.get_input_embeddings().weight
    adapter.model.save_pretrained(tied_dir)
    folder = _save(tied_dir, tmp_path, "rtn", "w4a4")
    fake, manifest = load_quantized(folder)
    assert manifest["aliases"], "the tied head was stored twice"
    direct, _ = load_quantized(folder, packed=True, backend="torch")
    assert direct.model.lm_head.weight is direct.model.get_input_embeddings().weight
    packed = copy.deepcopy(fake.model)
    convert_to_packed(packed, backend="torch")
    with torch.inference_mode():
        want = packed(**fake.encode(calibration.requests)).logits
    assert torch.equal(_logits(direct, calibration.requests), want)


def test_eval_execution_packed_loads_packed_and_labels_real(tiny_model_dir, tmp_path, monkeypatch):
    from qvlm_harness import checkpoint
    from qvlm_harness.store import Store

    ck = tmp_path / "ck"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "w4a4",
                 "--output", str(ck)]) == 0
    calls = []
    real = checkpoint.load_quantized
    monkeypatch.setattr(checkpoint, "load_quantized", lambda *a, **k: calls.append(k) or real(*a, **k))
    tail = ["--tasks", "sqa", "--limit", "2", "--max-new-tokens", "2", "--no-progress"]
    assert main(["eval", "--model", str(ck), "--execution", "packed", "--output", str(tmp_path / "p"), *tail]) == 0
    assert main(["eval", "--model", str(ck), "--output", str(tmp_path / "s"), *tail]) == 0
    assert [c.get("packed") for c in calls] == [True, False]
    (p,), (s,) = list(Store(tmp_path / "p" / "harness.db").rows()), list(Store(tmp_path / "s" / "harness.db").rows())
    assert (p.execution, s.execution) == ("real", "simulated")
