"""Every bad input stops before any work, in one line, and nothing computed is lost.

`CASES` is the table of bad inputs (flags, files, data, checkpoints, baselines). Each runs through the CLI in this
process and must end with exit code 2 and exactly one line on stderr starting with `error:` and containing the
case's needle (the only line at all for `planner` cases; the last, after the run's progress lines, for `load`
cases), with no traceback; the stores of the workspace must be unchanged (byte for byte when the input is
found by the planner, row for row when it can only be found while loading the model). Where the case says
`planner`, loading a model fails the test: the input must be found before any model loads. `load` cases are
the inputs only the loader can see (tensor names, a tokenizer file's contents, values inside a checkpoint's
tensors): they fail while loading, before any quantization or evaluation, so no computed result exists to lose.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qvlm_harness.cli import main

PLANNER, LOAD = "planner", "load"


@dataclass
class Workspace:
    """Files the cases point at, built once: a store with a real row, a checkpoint, broken model folders,
    broken data folders, broken stores and baselines."""

    root: Path
    model: Path
    out: Path  # --output of the run cases: holds harness.db with one finished cell
    checkpoint: Path

    def p(self, name: str) -> str:
        return str(self.root / name)


def _copy_model(ws_root: Path, model: Path, name: str, mutate: Callable[[Path], None]) -> None:
    folder = ws_root / name
    shutil.copytree(model, folder)
    mutate(folder)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_a_tensor(folder: Path) -> None:
    """A whole, well-formed weights file that lacks one tensor: only the load can see it."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    del tensors[next(k for k in sorted(tensors) if k.endswith(".bias"))]
    save_file(tensors, str(folder / "model.safetensors"))


def _nan_scale(checkpoint: Path) -> None:
    """A checkpoint whose tensor file and manifest agree (resealed) but one weight scale is NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    from qvlm_harness.checkpoint import _sha256
    from qvlm_harness.manifest import seal

    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith("w_scale"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["tensors_sha256"] = _sha256(path)
    (checkpoint / "manifest.json").write_text(json.dumps(seal(manifest)))
    assert torch.isnan(load_file(str(path))[key]).any()


def _sqa_data(folder: Path, mutate: Callable[[Path], None]) -> None:
    from tests.test_task_sqa import write_official

    write_official(folder)
    mutate(folder)


def _official_split_layout(folder: Path) -> None:
    """The `test/<pid>/image.png` layout (no images/ folder), with one image missing."""
    shutil.move(str(folder / "images" / "test"), str(folder / "test"))
    shutil.rmtree(folder / "images")
    (folder / "test" / "3" / "image.png").unlink()


def _unwritable_folder(root: Path) -> Path | None:
    """A folder this process cannot create files in: a read-only folder, or (root ignores permission bits) a
    path under /sys, where nobody can create files."""
    from qvlm_harness.writable import probe_write

    ro = root / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate, base in ((ro / "out", ro), (Path("/sys/harness-out"), Path("/sys"))):
        try:
            probe_write(base)
        except OSError:
            return candidate
    return None


@pytest.fixture(scope="module")
def ws(tiny_model_dir, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("bad-inputs")
    model = Path(tiny_model_dir)
    out = root / "out"
    assert main(["run", "--methods", "fp32", "--tasks", "sqa", "--model", str(model), "--limit", "2",
                 "--max-new-tokens", "2", "--no-progress", "--output", str(out)]) == 0
    ck = root / "ck"
    assert main(["quantize", "--method", "rtn", "--bits", "w4a8", "--model", str(model), "--output", str(ck)]) == 0
    shutil.copytree(ck, root / "ck-nan")
    _nan_scale(root / "ck-nan")
    shutil.copytree(ck, root / "ck-truncated")
    _truncate(root / "ck-truncated" / "model.safetensors")
    # model folders
    _copy_model(root, model, "no-weights", lambda d: (d / "model.safetensors").unlink())
    _copy_model(root, model, "truncated", lambda d: _truncate(d / "model.safetensors"))
    _copy_model(root, model, "no-tokenizer", lambda d: (d / "tokenizer.json").unlink())
    _copy_model(root, model, "bad-tokenizer", lambda d: (d / "tokenizer.json").write_text("{}"))
    _copy_model(root, model, "config-not-json", lambda d: (d / "config.json").write_text("{not json"))
    _copy_model(root, model, "config-list", lambda d: (d / "config.json").write_text("[1, 2]"))
    _copy_model(root, model, "config-binary", lambda d: (d / "config.json").write_bytes(bytes(range(256))))
    _copy_model(root, model, "config-bad-llava", lambda d: (d / "config.json").write_text(json.dumps(
        {"model_type": "llava", "text_config": {"model_type": "no-such-model"}})))
    _copy_model(root, model, "config-bert", lambda d: (d / "config.json").write_text('{"model_type": "bert"}'))
    _copy_model(root, model, "missing-tensor", _drop_a_tensor)
    (root / "not-a-model").mkdir()
    # data folders
    _sqa_data(root / "sqa-missing-image", lambda d: (d / "images" / "test" / "3" / "image.png").unlink())
    _sqa_data(root / "sqa-corrupt-image", lambda d: (d / "images" / "test" / "3" / "image.png").write_bytes(
        b"\x89PNG\r\n\x1a\n not really"))
    _sqa_data(root / "sqa-truncated-image", lambda d: _truncate(d / "images" / "test" / "3" / "image.png"))
    _sqa_data(root / "sqa-split-layout", _official_split_layout)
    _sqa_data(root / "sqa-bad-problems", lambda d: (d / "problems.json").write_text("{"))
    # files standing where folders or stores should be
    (root / "a-file").write_text("not a folder")
    (root / "garbage.db").write_bytes(b"not a database " * 100)
    con = sqlite3.connect(root / "other.db")
    con.execute("CREATE TABLE users (name TEXT)")
    con.commit()
    con.close()
    con = sqlite3.connect(root / "newer.db")
    con.execute("CREATE TABLE results (cell_id TEXT)")
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    # baselines
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "binary.json").write_bytes(bytes(range(256)) * 4)
    (root / "bad-cell.json").write_text(json.dumps({"format": "qvlm-harness-baseline", "version": 1,
                                                    "cells": [{"method": "rtn"}]}))
    (root / "baselines-as-file").write_text("x")
    return Workspace(root, model, out, ck)


def run_args(ws: Workspace, *extra: str, methods: str = "rtn", bits: str = "w4a4", model: str | None = None,
             output: str | None = None, tasks: str = "sqa") -> list[str]:
    return ["run", "--methods", methods, "--tasks", tasks, "--bits", bits, "--model", model or str(ws.model),
            "--limit", "2", "--max-new-tokens", "2", "--no-progress", "--output", output or str(ws.out), *extra]


def fp32_on(ws: Workspace, name: str) -> list[str]:
    return run_args(ws, methods="fp32", model=ws.p(name))


def data(ws: Workspace, name: str, methods: str = "fp32") -> list[str]:
    return run_args(ws, "--data-dir", ws.p(name), methods=methods)


def evaluate(ws: Workspace, *extra: str, model: str | None = None) -> list[str]:
    return ["eval", "--model", model or str(ws.checkpoint), "--tasks", "sqa", "--limit", "2", "--max-new-tokens",
            "2", "--no-progress", "--output", str(ws.out), *extra]


def quantize(ws: Workspace, *extra: str, bits: str = "w4a16", model: str | None = None,
             output: str | None = None) -> list[str]:
    return ["quantize", "--method", "rtn", "--bits", bits, "--model", model or str(ws.model), "--output",
            output or ws.p("new-checkpoint"), *extra]


def compare(ws: Workspace, *extra: str) -> list[str]:
    return ["compare", "--output", str(ws.out), *extra]


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Workspace], list[str]]
    needle: str  # a substring of the one error line
    when: str = PLANNER  # PLANNER: no model may load; LOAD: found by the loader, before any quantization


CASES = [
    # --bits: repeated, contradictory, meaningless flags
    Case("bits-flag-twice", lambda w: run_args(w, bits="w4a4-wasym-wasym"), "-wasym is given twice"),
    Case("bits-sym-twice", lambda w: run_args(w, bits="w4a4-sym-sym"), "-sym is given twice"),
    Case("bits-dynamic-static", lambda w: run_args(w, bits="w8a8-tensor-dynamic-static"), "contradict"),
    Case("bits-sym-asym", lambda w: run_args(w, bits="w4a4-sym-asym"), "contradict"),
    Case("bits-tensor-token", lambda w: run_args(w, bits="w4a4-tensor-token"), "contradict"),
    Case("bits-unknown-flag", lambda w: run_args(w, bits="w4a4-fast"), "unknown flag -fast"),
    Case("bits-act-flag-on-a16", lambda w: run_args(w, bits="w4a16-sym"), "drop -sym"),
    Case("bits-group-on-w16", lambda w: run_args(w, bits="w16a8g64"), "drop g64"),
    Case("bits-unparseable", lambda w: run_args(w, bits="w4x4"), "cannot parse bit-width"),
    Case("bits-empty", lambda w: run_args(w, bits=","), "--bits is empty"),
    Case("bits-too-wide", lambda w: run_args(w, bits="w9a8"), "weight bits must be"),
    # the group-size rule (widths from the config, before the model loads)
    Case("group-divides-no-layer", lambda w: run_args(w, bits="w4a16g7"), "divides the input width of none"),
    Case("group-divides-no-layer-gptq", lambda w: run_args(w, methods="gptq", bits="w4a16g7"), "g64"),
    Case("group-option-divides-no-layer", lambda w: run_args(w, "--method-option", "gptq.group_size=48",
                                                              methods="gptq", bits="w4a16"), "group_size=48"),
    Case("group-bits-vs-option", lambda w: run_args(w, "--method-option", "gptq.group_size=64", methods="gptq",
                                                     bits="w4a16g128"), "give one of them"),
    Case("quantize-group-divides-no-layer", lambda w: quantize(w, bits="w4a16g7"), "divides the input width"),
    # numeric flags and names (the planner's range checks)
    Case("batch-size-0", lambda w: run_args(w, "--batch-size", "0"), "--batch-size"),
    Case("threads-0", lambda w: run_args(w, "--threads", "0"), "--threads"),
    Case("limit-0", lambda w: run_args(w, "--limit", "0"), "--limit"),
    Case("shots-negative", lambda w: run_args(w, "--shots", "-1"), "--shots"),
    Case("shots-not-numbers", lambda w: run_args(w, "--shots", "a,b"), "comma-separated integers"),
    Case("seed-too-large", lambda w: run_args(w, "--seed", str(2**64)), "--seed"),
    Case("max-new-tokens-0", lambda w: run_args(w, "--max-new-tokens", "0"), "--max-new-tokens"),
    Case("device-unknown", lambda w: run_args(w, "--device", "tpu"), "--device"),
    Case("calib-samples-0-gptq", lambda w: run_args(w, "--calib-samples", "0", methods="gptq"), "--calib-samples"),
    Case("method-unknown", lambda w: run_args(w, methods="rnt"), "Did you mean 'rtn'"),
    Case("task-unknown", lambda w: run_args(w, tasks="scienceqaa"), "Did you mean"),
    Case("method-option-typed", lambda w: run_args(w, "--method-option", "gptq.percdamp=abc", methods="gptq"),
         "percdamp"),
    Case("method-option-syntax", lambda w: run_args(w, "--method-option", "percdamp"), "METHOD.OPTION=VALUE"),
    Case("scope-unknown", lambda w: run_args(w, "--quantize", "vision,decoder"), "--quantize takes"),
    # where results go
    Case("output-is-a-file", lambda w: run_args(w, output=w.p("a-file")), "is a file, not a folder"),
    Case("output-is-a-file-store-elsewhere", lambda w: run_args(w, "--store", w.p("elsewhere.db"),
                                                                output=w.p("a-file")), "is a file, not a folder"),
    Case("output-under-a-file", lambda w: run_args(w, output=w.p("a-file/out")), "is a file"),
    Case("store-is-a-folder", lambda w: run_args(w, "--store", str(w.root)), "is a folder"),
    Case("store-not-sqlite", lambda w: run_args(w, "--store", w.p("garbage.db")), "not a SQLite file"),
    Case("store-other-tables", lambda w: run_args(w, "--store", w.p("other.db")), "other tables"),
    Case("store-newer-schema", lambda w: run_args(w, "--store", w.p("newer.db")), "newer qvlm-harness"),
    Case("quantize-output-is-a-file", lambda w: quantize(w, output=w.p("a-file")), "is a file, not a folder"),
    Case("quantize-output-not-empty", lambda w: quantize(w, output=str(w.out)), "not a quantized checkpoint"),
    Case("compare-json-is-a-folder", lambda w: compare(w, "--baseline", w.p("list.json"), "--json", str(w.root)),
         "--json"),
    # model folders
    Case("model-missing", lambda w: fp32_on(w, "no-such-folder"), "does not exist"),
    Case("model-not-a-model-folder", lambda w: fp32_on(w, "not-a-model"), "no config.json"),
    Case("model-without-weights", lambda w: fp32_on(w, "no-weights"), "holds no weights"),
    Case("model-truncated-weights", lambda w: fp32_on(w, "truncated"), "model.safetensors is truncated"),
    Case("model-without-tokenizer", lambda w: fp32_on(w, "no-tokenizer"), "has no tokenizer"),
    Case("model-config-not-json", lambda w: fp32_on(w, "config-not-json"), "config.json is not valid JSON"),
    Case("model-config-a-list", lambda w: fp32_on(w, "config-list"), "holds a JSON list"),
    Case("model-config-binary", lambda w: fp32_on(w, "config-binary"), "config.json is not a text file"),
    Case("model-config-unknown-llm", lambda w: fp32_on(w, "config-bad-llava"), "cannot be read by transformers"),
    Case("model-not-llava", lambda w: fp32_on(w, "config-bert"), "not Llava"),
    Case("quantize-model-truncated", lambda w: quantize(w, model=w.p("truncated")), "is truncated"),
    Case("quantize-model-config-not-json", lambda w: quantize(w, model=w.p("config-not-json")), "not valid JSON"),
    Case("quantize-model-without-tokenizer", lambda w: quantize(w, model=w.p("no-tokenizer")), "has no tokenizer"),
    Case("model-missing-tensor", lambda w: fp32_on(w, "missing-tensor"), "missing tensor", LOAD),
    Case("model-corrupt-tokenizer", lambda w: fp32_on(w, "bad-tokenizer"), "processor", LOAD),
    Case("quantize-model-corrupt-tokenizer", lambda w: quantize(w, model=w.p("bad-tokenizer")), "processor", LOAD),
    # checkpoints
    Case("eval-bits", lambda w: evaluate(w, "--bits", "w8a8"), "drop --bits"),
    Case("eval-quantize-and-calib", lambda w: evaluate(w, "--quantize", "lm", "--calib-samples", "8"),
         "drop --quantize, --calib-samples"),
    Case("eval-methods", lambda w: evaluate(w, "--methods", "rtn"), "drop --methods"),
    Case("eval-float-model", lambda w: evaluate(w, model=str(w.model)), "not a quantized checkpoint"),
    Case("run-on-a-checkpoint", lambda w: run_args(w, model=str(w.checkpoint)), "harness eval"),
    Case("eval-truncated-checkpoint", lambda w: evaluate(w, model=w.p("ck-truncated")), "is truncated"),
    Case("eval-nan-scale", lambda w: evaluate(w, model=w.p("ck-nan")), "holds NaN (a corrupt quantized checkpoint",
         LOAD),
    # data
    Case("data-dir-missing", lambda w: data(w, "no-such-data"), "does not exist"),
    Case("data-missing-image", lambda w: data(w, "sqa-missing-image"), "missing image for sample 3"),
    Case("data-missing-image-calibration", lambda w: run_args(w, "--data-dir", w.p("sqa-missing-image"),
                                                               "--calib-task", "sqa", methods="gptq", bits="w4a16"),
         "missing image"),
    Case("data-corrupt-image", lambda w: data(w, "sqa-corrupt-image"), "corrupt image for sample 3"),
    Case("data-truncated-image", lambda w: data(w, "sqa-truncated-image"), "corrupt image for sample 3"),
    Case("data-split-layout-names-its-path", lambda w: data(w, "sqa-split-layout"), "sqa-split-layout/test/3/image"),
    Case("data-bad-problems-json", lambda w: data(w, "sqa-bad-problems"), "problems.json is not valid JSON"),
    # baselines
    Case("baseline-a-json-list", lambda w: compare(w, "--baseline", w.p("list.json")), "not a qvlm-harness baseline"),
    Case("baseline-binary", lambda w: compare(w, "--baseline", w.p("binary.json")), "not a text file"),
    Case("baseline-malformed-cell", lambda w: compare(w, "--baseline", w.p("bad-cell.json")), "malformed cell"),
    Case("baseline-missing", lambda w: compare(w, "--baseline", w.p("nope.json")), "not found"),
    Case("save-baseline-into-a-file", lambda w: compare(w, "--save-baseline", "b", "--baselines-dir",
                                                        w.p("baselines-as-file")), "is a file"),
]


def _stores(ws: Workspace) -> dict[str, str]:
    """sha256 of every store file of the workspace."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ws.root.rglob("*.db"))}


def _rows(ws: Workspace) -> list[tuple]:
    """The rows of the run cases' store, read without opening it for writing."""
    con = sqlite3.connect(f"file:{ws.out / 'harness.db'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT cell_id, metrics, superseded_by FROM results ORDER BY cell_id").fetchall()
    finally:
        con.close()


@pytest.fixture
def forbid_model_loads(monkeypatch):
    """Every way the harness loads a model fails the test."""
    import qvlm_harness.checkpoint as checkpoint
    import qvlm_harness.executors as executors
    from qvlm_harness.models.llava import LlavaAdapter

    def loaded(*_a, **_k):
        pytest.fail("a model was loaded for an input the planner can check")

    monkeypatch.setattr(LlavaAdapter, "load", classmethod(loaded))
    for module, name in ((checkpoint, "load_float"), (checkpoint, "load_quantized"), (checkpoint, "load_adapter"),
                         (executors, "load_adapter")):
        monkeypatch.setattr(module, name, loaded)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_before_any_work(ws, case, capsys, request):
    if case.when == PLANNER:
        request.getfixturevalue("forbid_model_loads")
    stores, rows = _stores(ws), _rows(ws)
    argv = case.argv(ws)
    capsys.readouterr()
    code = main(argv)
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.strip()]
    assert code == 2, (case.id, err)
    assert "Traceback" not in text
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], (case.id, err)
    assert case.needle in errors[0], (case.id, errors[0])
    if case.when == PLANNER:  # nothing ran: the error is all there is
        assert len(err) == 1, (case.id, err)
    assert _rows(ws) == rows
    if case.when == PLANNER:
        assert _stores(ws) == stores, case.id  # byte-identical: nothing opened the stores for writing


def test_unwritable_output_and_store_are_refused_before_any_work(ws, tmp_path, capsys, forbid_model_loads):
    folder = _unwritable_folder(tmp_path)
    if folder is None:
        pytest.skip("no folder on this machine refuses writes to this user")
    for argv in (run_args(ws, output=str(folder)), run_args(ws, "--store", str(folder / "harness.db")),
                 quantize(ws, output=str(folder)), ["bench", "--model", str(ws.model), "--output", str(folder)]):
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "not writable" in err[0], (argv, err)
    assert not any(p.name.startswith(".harness-write-probe") for p in tmp_path.rglob("*"))


def test_validate_reports_file_problems_with_the_others_and_creates_nothing(ws, tmp_path, capsys,
                                                                           forbid_model_loads):
    out = tmp_path / "fresh" / "out"
    code = main(["validate", "--methods", "rtn", "--tasks", "sqa", "--bits", "w4a16g7", "--model",
                 ws.p("truncated"), "--data-dir", ws.p("sqa-corrupt-image"), "--output", str(out), "--limit", "9"])
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and any("truncated" in p for p in problems) and any("corrupt image" in p for p in problems)
    assert not (tmp_path / "fresh").exists()  # the write probe leaves nothing behind, not even the folder


def test_a_model_that_passes_the_planner_with_a_group_that_fits_some_layers_notes_the_fallback(ws, capsys,
                                                                                          forbid_model_loads):
    code = main(["validate", "--methods", "rtn,gptq", "--tasks", "sqa", "--bits", "w4a16g128", "--model",
                 str(ws.model), "--limit", "2", "--output", str(ws.out)])
    err = capsys.readouterr().err
    assert code == 0
    notes = [line for line in err.splitlines() if "per output channel" in line]
    assert len(notes) == 2 and all("11 of 28 layers (widths 64)" in n for n in notes), err


def test_group_rule_is_the_same_for_every_method(ws):
    """What the planner promises (per-channel where G does not divide the width, groups of G elsewhere) is what
    RTN, GPTQ and AWQ build: each quantized layer's group size against its input width."""
    from qvlm_harness import plugins
    from qvlm_harness.calibration import CalibrationSet
    from qvlm_harness.config import QuantSpec
    from qvlm_harness.models.llava import LlavaAdapter
    from qvlm_harness.quant import QLinear
    from qvlm_harness.quantize import quantize as quantize_model

    spec = QuantSpec.parse("w4a16g128")
    calibration = CalibrationSet.from_task(plugins.tasks.get("sqa")(), 2, 0)
    for name in ("rtn", "gptq", "awq"):
        adapter = LlavaAdapter.load(ws.model)
        qm = quantize_model(adapter, plugins.methods.get(name)(), spec, calibration, measure_fp_pass=False)
        layers = {n: m for n, m in qm.adapter.model.named_modules() if isinstance(m, QLinear)}
        assert len(layers) == 28, name
        for n, m in layers.items():
            expected = 128 if m.in_features % 128 == 0 else None
            assert m.w_qgroup == expected, (name, n, m.in_features, m.w_qgroup)


def test_an_unreadable_store_row_is_recomputed_not_silently_dropped(ws, tmp_path, capsys):
    """A row edited by hand (its metrics no longer JSON) is reported, recomputed from its sample log and
    replaced: the run's tables still have the cell."""
    from qvlm_harness.store import Store

    out = tmp_path / "out"
    shutil.copytree(ws.out, out)
    argv = ["run", "--methods", "fp32", "--tasks", "sqa", "--model", str(ws.model), "--limit", "2",
            "--max-new-tokens", "2", "--no-progress", "--output", str(out)]
    (before,) = list(Store(out / "harness.db").rows())
    con = sqlite3.connect(out / "harness.db")
    con.execute("UPDATE results SET metrics = 'not json' WHERE cell_id = ?", (before.cell_id,))
    con.commit()
    con.close()
    assert main(argv) == 0
    text = capsys.readouterr().err
    assert "1 to compute" in text
    (after,) = list(Store(out / "harness.db").rows())
    assert after.cell_id == before.cell_id and after.metrics == before.metrics


def test_images_are_decoded_once_per_file_version(tmp_path, monkeypatch):
    """The planner's image check decodes a file once; a changed file (size or mtime) is decoded again and a bad
    one is refused even after its earlier version passed."""
    from PIL import Image

    import qvlm_harness.images as images
    from qvlm_harness.errors import DataError

    monkeypatch.setenv("QVLM_HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(images, "_checked", {})
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i, 0, 0)).save(paths[-1])
    pairs = [(f"sample {i}", p) for i, p in enumerate(paths)]
    assert images.check_images(pairs) == 5
    assert images.check_images(pairs) == 0
    monkeypatch.setattr(images, "_checked", {})  # a new process: the harness cache remembers
    assert images.check_images(pairs) == 0
    paths[2].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="corrupt image for sample 2"):
        images.check_images(pairs)
    assert images.check_images([(None, None), ("bytes", paths[0].read_bytes())]) == 1


def test_packed_kernels_are_prepared_at_conversion_not_in_the_first_timed_call(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """The fused kernel is built while converting (here a build that takes a while and then fails, like a missing
    compiler), so no cell's prefill latency contains it: the packed cell's latency stays within a small ratio of
    the float cell's in the same run, though the build alone takes far longer than a float prefill."""
    import time

    from qvlm_harness.config import QuantSpec, RunSpec
    from qvlm_harness.kernels import cpu
    from qvlm_harness.runner import Runner

    build_s = 1.5
    calls = []

    def slow_failing_build() -> None:
        calls.append(time.perf_counter())
        time.sleep(build_s)
        raise RuntimeError("no compiler here")

    monkeypatch.delenv("QVLM_HARNESS_NO_CPP", raising=False)
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(cpu, "_load", slow_failing_build)
    logs: list[str] = []
    spec = RunSpec(methods=["fp32", "rtn"], tasks=["sqa"], bits=[QuantSpec.parse("w8a8")], model=str(tiny_model_dir),
                   limit=2, max_new_tokens=2, batch_size=1, execution="packed", output=tmp_path)
    rows = {r.method: r for r in Runner(spec, log=logs.append, progress=False).run().rows}
    assert len(calls) == 1 and rows["rtn"].execution == "real"
    assert any("fused CPU kernel off" in m and "no compiler here" in m for m in logs), logs
    fp_ms = rows["fp32"].measurements["prefill_ms_per_sample"]
    packed_ms = rows["rtn"].measurements["prefill_ms_per_sample"]
    if 20 * fp_ms > 1000 * build_s:
        pytest.skip(f"float prefill takes {fp_ms:.0f} ms here: too slow to tell a {build_s} s build apart")
    assert packed_ms < 10 * fp_ms, (packed_ms, fp_ms)
