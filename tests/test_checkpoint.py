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


# -- the manifest cannot be edited silently -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def rtn_checkpoint(tiny_model_dir, calibration, tmp_path_factory):
    """One RTN W4A8 checkpoint (static ranges: a_scale/a_zero stored); tests edit copies of it."""
    _, _, folder = quantize_and_save(tiny_model_dir, calibration, tmp_path_factory.mktemp("rtn"), "rtn",
                                     "w4a8-tensor-static", {})
    return folder


def copy_of(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "ck")


def edit_manifest(folder, change, reseal: bool = False) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(seal(manifest) if reseal else manifest))


def first_module(m: dict) -> dict:
    return m["modules"][next(iter(m["modules"]))]


EDITS = {
    "spec": lambda m: m["spec"].update(w_bits=8, tag="w8a8-tensor-static"),
    "method": lambda m: m.update(method="gptq"),
    "execution": lambda m: m.update(execution="real"),
    "config": lambda m: m["config"].update(observer="minmax"),
    "module a_bits": lambda m: first_module(m)["meta"]["spec"].update(a_bits=4),
    "module dropped": lambda m: m["modules"].pop(next(iter(m["modules"]))),
    "describe": lambda m: m.update(describe="GPTQ with act-order"),
    "report": lambda m: m.update(report={"rtn_fallback": 0}),
    "tensor hash": lambda m: m.update(tensors_sha256="0" * 64),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_any_manifest_edit_is_refused(rtn_checkpoint, tmp_path, edit):
    folder = copy_of(rtn_checkpoint, tmp_path)
    load_quantized(folder)  # the copy itself is intact
    edit_manifest(folder, EDITS[edit])
    with pytest.raises(HarnessError, match="was edited after harness quantize wrote it") as exc:
        load_quantized(folder)
    assert "re-run harness quantize" in str(exc.value)


RESEALED = {  # the labels contradict the modules even with the manifest's hash recomputed
    "execution real": (lambda m: m.update(execution="real"), "execution is 'real' but module .* runs simulated"),
    "execution float": (lambda m: m.update(execution="float"), "execution is 'float' but 28 module"),
    "spec bits": (lambda m: m["spec"].update(w_bits=8, tag="w8a8-tensor-static"),
                  "has w_bits=4, but the spec w8a8-tensor-static says 8"),
    "spec dynamic": (lambda m: m["spec"].update(a_granularity="token", a_dynamic=True, tag="w4a8"),
                     "has a_granularity='tensor', but the spec w4a8 says 'token'"),
    "module a_bits": (lambda m: first_module(m)["meta"]["spec"].update(a_bits=4, tag="w4a4-tensor-static"),
                      "has a_bits=4, but the spec w4a8-tensor-static says 8"),
    "method with other types": (lambda m: m.update(method="qlora"), "unknown type 'QLinear': method qlora produces"),
    "method with other options": (lambda m: m.update(method="gptq"), "recorded config is not valid"),
    "config value": (lambda m: m["config"].update(observer="median"), "recorded config is not valid"),
    "config version": (lambda m: m["config"].update(version=0), "config has version 0"),
    "unknown method": (lambda m: m.update(method="mystery"), "which this harness does not have"),
}


@pytest.mark.parametrize("edit", list(RESEALED))
def test_labels_the_modules_contradict_are_refused(rtn_checkpoint, tmp_path, edit):
    folder = copy_of(rtn_checkpoint, tmp_path)
    change, message = RESEALED[edit]
    edit_manifest(folder, change, reseal=True)
    with pytest.raises(HarnessError, match=message):
        load_quantized(folder)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.pop("modules"), "has no field 'modules'"),
    (lambda m: m.pop("tensors_sha256"), "has no field 'tensors_sha256'"),
    (lambda m: m.update(spec="w4a8-tensor-static"), "field 'spec' is a string, expected an object"),
    (lambda m: first_module(m).pop("meta"), "has no 'meta'"),
    (lambda m: m.update(format="qvlm-harness-quantized/1"), "has format 'qvlm-harness-quantized/1'"),
])
def test_malformed_manifest_is_one_line_at_the_cli(rtn_checkpoint, tmp_path, capsys, change, message):
    from qvlm_harness.cli import main

    folder = copy_of(rtn_checkpoint, tmp_path)
    edit_manifest(folder, change, reseal=True)
    with pytest.raises(HarnessError, match=message):
        load_quantized(folder)
    assert main(["eval", "--model", str(folder), "--tasks", "sqa", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len([x for x in err.splitlines() if x.strip()]) == 1


def test_other_files_are_hashed_and_extra_files_refused(rtn_checkpoint, tmp_path):
    folder = copy_of(rtn_checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vision_feature_layer"] = -1  # a silent behaviour change: another vision layer feeds the LM
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HarnessError, match="config.json does not match the hash"):
        load_quantized(folder)
    folder = copy_of(rtn_checkpoint, tmp_path / "2")
    (folder / "preprocessor_config.json").write_text("{}")
    with pytest.raises(HarnessError, match="preprocessor_config.json is not part of the checkpoint"):
        load_quantized(folder)
    (folder / "preprocessor_config.json").unlink()
    (folder / ".DS_Store").write_text("")  # hidden files are not the model's
    load_quantized(folder)


def test_stored_quantization_exposes_the_typed_config(tiny_model_dir, calibration, tmp_path):
    from qvlm_harness.checkpoint import StoredQuantization
    from qvlm_harness.methods.zeroquant_v2 import ZeroQuantV2Config

    _, qm, folder = quantize_and_save(tiny_model_dir, calibration, tmp_path, "zeroquant-v2", "w4a16",
                                      {"weights": "rtn", "rank": 4})
    manifest = json.loads((folder / "manifest.json").read_text())
    stored = StoredQuantization(manifest, str(folder))
    assert stored.config == ZeroQuantV2Config(weights="rtn", rank=4)
    assert stored.options["rank"] == 4 and stored.identity()["config"] == qm.config == manifest["config"]
    # the checkpoint's contents identify a cell through the model's content fingerprint (every file of the folder),
    # so a rewritten checkpoint supersedes the rows of the old one instead of starting an unrelated cell
    from qvlm_harness.identity import folder_fingerprint

    assert "checkpoint" not in stored.identity()
    before = folder_fingerprint(folder)
    manifest["describe"] = "edited"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert folder_fingerprint(folder) != before


# -- saving refuses what it cannot encode ------------------------------------------------------------------------------
def rtn_result(tiny_model_dir, bits="w4a16"):
    adapter = LlavaAdapter.load(tiny_model_dir)
    spec = QuantSpec.parse(bits)
    return plugins.methods.get("rtn")().quantize(adapter, None, spec)


def save(qm, folder):
    return save_quantized(qm, folder, describe="d", base_model="tiny", fingerprint="x", scope=("lm",))


def test_save_refuses_modules_nobody_can_encode(tiny_model_dir, tmp_path):
    from torch import nn

    from qvlm_harness.quant.apply import _set_submodule
    from qvlm_harness.quant.nf4 import nf_quantize

    target = "model.language_model.layers.0.mlp.down_proj"

    class TweakedQLinear(QLinear):  # inherits QLinear's codec, but not its arithmetic: never saved as a QLinear
        def forward(self, x):
            return super().forward(x) * 2

    class Mystery(nn.Linear):
        pass

    qm = rtn_result(tiny_model_dir)
    q = qm.adapter.model.get_submodule(target)
    tweaked = TweakedQLinear(q.in_features, q.out_features, q.spec, weight=q.weight, codes=q.codes,
                             w_qparams=q.w_qparams, name=q.name)
    lin = Mystery(q.in_features, q.out_features, bias=False)
    nf = NFLinear(nf_quantize(q.weight), None, q.spec, name=target)
    for module, message in [(tweaked, "TweakedQLinear\\): no codec encodes this type"),
                            (lin, "Mystery\\): no codec encodes this type, where the Llava model has a Linear"),
                            (nf, "NFLinear\\): method rtn does not list NFLinear in Method.produces")]:
        _set_submodule(qm.adapter.model, target, module)
        with pytest.raises(HarnessError, match=f"cannot save module {target} \\({message}"):
            save(qm, tmp_path / "ck")
        assert not (tmp_path / "ck").exists()  # refused before anything is written


def test_a_declared_type_without_codec_is_refused():
    from torch import nn

    from qvlm_harness.manifest import codecs_for
    from qvlm_harness.methods.rtn import RTN

    class Sloppy(RTN):
        name = "sloppy"
        produces = (QLinear, nn.Linear)

    with pytest.raises(HarnessError, match="sloppy declares Linear in Method.produces, but that type has no codec"):
        codecs_for(Sloppy)
    assert set(codecs_for(RTN)) == {"QLinear"}


def test_save_refuses_a_packed_model_and_wrong_labels(tiny_model_dir, tmp_path):
    from qvlm_harness.kernels.convert import convert_to_packed

    qm = rtn_result(tiny_model_dir, "w8a8")
    qm.execution = "real"  # a simulated model labelled real
    with pytest.raises(HarnessError, match="execution is 'real' but module .* runs simulated"):
        save(qm, tmp_path / "ck")
    qm.execution = "simulated"
    layer = qm.adapter.model.get_submodule("model.language_model.layers.1.self_attn.o_proj")
    layer.calibrating = True  # would load as a calibrated layer: refused
    with pytest.raises(HarnessError, match="layers.1.self_attn.o_proj: it is still calibrating"):
        save(qm, tmp_path / "ck")
    layer.calibrating = False
    convert_to_packed(qm.adapter.model, backend="torch")
    with pytest.raises(HarnessError, match=r"\(IntLinear\): no codec encodes this type"):
        save(qm, tmp_path / "ck")


# -- float model folders load strictly ---------------------------------------------------------------------------------
def test_float_folder_with_missing_or_extra_tensors_is_refused(tiny_model_dir, tmp_path):
    import shutil

    from qvlm_harness.checkpoint import load_adapter

    reference = LlavaAdapter.load(tiny_model_dir).model.state_dict()
    loaded = load_adapter(str(tiny_model_dir)).model.state_dict()
    assert reference.keys() == loaded.keys() and all(torch.equal(reference[k], loaded[k]) for k in reference)
    stored = load_file(str(tiny_model_dir / "model.safetensors"))
    dropped = next(k for k in stored if k.endswith("mlp.down_proj.weight"))
    for name, tensors, message in [
        ("missing", {k: v for k, v in stored.items() if k != dropped}, "1 missing tensor.*initialised randomly"),
        ("extra", stored | {"model.extra.weight": torch.zeros(2)}, "1 unexpected \\(e.g. model.extra.weight\\)"),
    ]:
        folder = shutil.copytree(tiny_model_dir, tmp_path / name)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(HarnessError, match=message):
            load_adapter(str(folder))


# -- the found bug: a qvlm-official checkpoint could not be evaluated --------------------------------------------------
def test_qvlm_official_quantize_then_eval_matches_run(tiny_model_dir, tmp_path):
    from qvlm_harness.cli import main
    from qvlm_harness.store import Store

    common = ["--calib-samples", "4", "--method-option", "qvlm-official.n_calib=2"]
    ck = tmp_path / "ck"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "qvlm-official", "--bits", "w4a4",
                 "--output", str(ck), *common]) == 0
    evaluated, ran = tmp_path / "eval", tmp_path / "run"
    tail = ["--tasks", "sqa", "--limit", "3", "--max-new-tokens", "3", "--no-progress"]
    assert main(["eval", "--model", str(ck), "--output", str(evaluated), *tail]) == 0
    assert main(["run", "--model", str(tiny_model_dir), "--methods", "qvlm-official", "--bits", "w4a4",
                 "--output", str(ran), *common, *tail]) == 0
    (a,), (b,) = list(Store(evaluated / "harness.db").rows()), list(Store(ran / "harness.db").rows())
    assert (a.method, a.bits, a.execution) == (b.method, b.bits, b.execution) == ("qvlm-official", "w4a4",
                                                                                    "simulated")
    assert a.metrics == b.metrics


def test_qvlm_official_vision_rows_round_trip(tiny_model_dir, calibration, tmp_path):
    """The released code's per-token-row vision branch (quantize_vision=true): its row ranges are sized by the
    calibration image, and stored as they are."""
    from qvlm_harness.methods.qvlm_official import OfficialQLinear

    options = {"quantize_vision": True, "n_calib": 2, "n_search": 1}
    adapter, qm, folder = quantize_and_save(tiny_model_dir, calibration, tmp_path, "qvlm-official", "w4a4", options)
    rows = [m for m in adapter.model.modules() if isinstance(m, OfficialQLinear) and m.kind == "row"]
    assert rows and all(m.range_min.numel() > 0 for m in rows)
    requests = [calibration.requests[i] for i in (0, 3)]  # text-only and with an image, padded together
    before = logits_of(adapter, requests)
    loaded, manifest = load_quantized(folder)
    assert torch.equal(before, logits_of(loaded, requests))
    kinds = {e["meta"]["kind"] for e in manifest["modules"].values()}
    assert kinds == {"channel", "row"} and len(manifest["modules"]) == len(qm.quantized_modules)


def logits_of(adapter, requests):
    with torch.no_grad():
        return adapter.model(**adapter.encode(requests)).logits
