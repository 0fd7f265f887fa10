"""Quantized checkpoints: quantize -> save -> load gives identical logits for every method; loading is strict."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qvlm_harness import plugins
from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.checkpoint import load_quantized, save_quantized
from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.manifest import seal
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.quant.lorc import LoRCLinear
from qvlm_harness.quant.nflinear import NFLinear
from qvlm_harness.quant.qlinear import QLinear

SLOW = pytest.mark.slow  # the searches take tens of seconds on a shared 2-core machine
CASES = [
    ("rtn", "w4a8", {}),
    ("qlora", "w4a16", {}),
    ("zeroquant-v2", "w4a8", {"weights": "rtn"}),
    pytest.param("awq", "w4a16", {}, marks=SLOW),
    pytest.param("gptq", "w4a4g64", {"act_order": True}, marks=SLOW),
    pytest.param("qlora", "w4a8-tensor-static", {}, marks=SLOW),
    pytest.param("zeroquant-v2", "w4a8", {}, marks=SLOW),
    pytest.param("smoothquant", "w8a8", {}, marks=SLOW),
]


@pytest.fixture(scope="module")
def calibration():
    task = plugins.tasks.get("sqa")()
    return CalibrationSet.from_task(task, 4, 0)


def logits(adapter, calibration):
    batch = adapter.encode(calibration.requests[:3])
    with torch.no_grad():
        return adapter.model(**batch).logits


def quantize_and_save(tiny_model_dir, calibration, tmp_path, method, bits, options):
    adapter = LlavaAdapter.load(tiny_model_dir)
    spec = QuantSpec.parse(bits)
    m = plugins.methods.get(method)(**options)
    qm = m.quantize(adapter, calibration if m.needs_calibration(spec) else None, spec)
    folder = save_quantized(qm, tmp_path / f"{method}-{bits}", describe=m.describe(spec), base_model="tiny",
                            fingerprint="x", scope=("vision", "projector", "lm"))
    return adapter, qm, folder


@pytest.mark.parametrize(("method", "bits", "options"), CASES)
def test_round_trip_gives_identical_logits(tiny_model_dir, calibration, tmp_path, method, bits, options):
    adapter, qm, folder = quantize_and_save(tiny_model_dir, calibration, tmp_path, method, bits, options)
    before = logits(adapter, calibration)
    loaded, manifest = load_quantized(folder)
    after = logits(loaded, calibration)
    assert torch.equal(before, after)
    assert manifest["method"] == method and manifest["spec"]["tag"] == QuantSpec.parse(bits).tag
    types = {type(m) for m in loaded.model.modules()}
    expect = {"qlora": NFLinear, "zeroquant-v2": LoRCLinear}.get(method, QLinear)
    assert expect in types
    n_quant = sum(isinstance(m, QLinear | NFLinear) for m in loaded.model.modules())
    assert n_quant == len(qm.quantized_modules) == 28
    stored = load_file(str(folder / "model.safetensors"))
    assert not any(k.endswith(".weight") and k.replace(".weight", "") in manifest["modules"] and
                   manifest["modules"][k.replace(".weight", "")]["type"] == "QLinear" for k in stored)


def test_tampered_or_missing_tensors_raise(tiny_model_dir, calibration, tmp_path):
    _, _, folder = quantize_and_save(tiny_model_dir, calibration, tmp_path, "rtn", "w4a16", {})
    path = folder / "model.safetensors"
    original = load_file(str(path))
    key = next(k for k in original if k.endswith(".codes"))
    # 1. edited bytes: hash mismatch
    edited = dict(original)
    edited[key] = edited[key].clone()
    edited[key][0, 0] = 0 if int(edited[key][0, 0]) else 1
    save_file(edited, str(path))
    with pytest.raises(HarnessError, match="does not match the hash"):
        load_quantized(folder)
    # 2. a missing tensor, with the hashes updated to match (a consistent but incomplete file; `seal` recomputes
    #    the manifest's own hash, as a deliberate forger would)
    for drop in (key, "model.language_model.embed_tokens.weight"):
        partial = {k: v for k, v in original.items() if k != drop}
        save_file(partial, str(path))
        manifest = json.loads((folder / "manifest.json").read_text())
        from qvlm_harness.checkpoint import _sha256

        manifest["tensors_sha256"] = _sha256(path)
        (folder / "manifest.json").write_text(json.dumps(seal(manifest)))
        with pytest.raises(HarnessError, match=r"missing (tensors )?\['"):
            load_quantized(folder)
    # 3. an unknown module type
    manifest["modules"][next(iter(manifest["modules"]))]["type"] = "Mystery"
    (folder / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(HarnessError, match="unknown type"):
        load_quantized(folder)
