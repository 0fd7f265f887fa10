"""A cell is what it was computed from: in-place data edits and checkpoint overwrites recompute (the old row kept,
superseded), the store refuses NaN/empty rows and survives corrupt ones, concurrent runs of one cell count each
sample once."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from qvlm_harness.cli import main
from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.identity import folder_fingerprint, samples_fingerprint
from qvlm_harness.plan import make_plan
from qvlm_harness.runner import Runner
from qvlm_harness.store import ResultRow, SampleLog, Store
from qvlm_harness.task import Sample

EMBEDDED_SQA = Path(__file__).resolve().parent.parent / "tasks" / "data" / "sqa"


@pytest.fixture
def sqa_copy(tmp_path) -> Path:
    dst = tmp_path / "sqa"
    shutil.copytree(EMBEDDED_SQA, dst)
    return dst


def _run(spec: RunSpec):
    return Runner(spec, log=lambda m: None, progress=False).run()


def _spec(model, tmp_path, data_dir, **kw) -> RunSpec:
    base = dict(methods=["fp32"], tasks=["sqa"], model=str(model), limit=4, output=tmp_path / "out",
                data_dir=data_dir, max_new_tokens=2, batch_size=2)
    return RunSpec(**(base | kw))


def test_in_place_data_edit_recomputes_and_supersedes(tiny_model_dir, tmp_path, sqa_copy):
    spec = _spec(tiny_model_dir, tmp_path, sqa_copy)
    first = _run(spec)
    assert first.computed == 1
    assert _run(spec).reused == 1  # unchanged data: reused
    plan = make_plan(spec)
    pid = plan.samples("sqa")[0].id
    problems = json.loads((sqa_copy / "problems.json").read_text())
    problems[pid]["answer"] = (problems[pid]["answer"] + 1) % len(problems[pid]["choices"])  # one answer changes
    (sqa_copy / "problems.json").write_text(json.dumps(problems))
    again = _run(spec)
    assert again.computed == 1 and again.reused == 0
    assert again.rows[0].cell_id != first.rows[0].cell_id and again.rows[0].cell_key == first.rows[0].cell_key
    store = Store(spec.store_path)
    old = store.get(first.rows[0].cell_id)
    assert old is not None and old.superseded_by == again.rows[0].cell_id  # kept, marked
    assert [r.cell_id for r in store.rows()] == [again.rows[0].cell_id]  # reports see the current row only
    # the new row was computed from the new data, not from the old sample log
    assert again.rows[0].data_fingerprint != first.rows[0].data_fingerprint


def test_an_image_edit_changes_the_data_fingerprint(tmp_path):
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(a)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(b)
    fa = samples_fingerprint([Sample("1", a, {"q": "x"})])
    assert fa == samples_fingerprint([Sample("1", b, {"q": "x"})])  # same bytes elsewhere: same data
    Image.new("RGB", (4, 4), (9, 2, 3)).save(a)
    assert samples_fingerprint([Sample("1", a, {"q": "x"})]) != fa


def test_checkpoint_overwrite_recomputes(tiny_model_dir, tmp_path):
    ck = tmp_path / "ck"
    args = ["--model", str(tiny_model_dir), "--output", str(ck)]
    assert main(["quantize", "--method", "rtn", "--bits", "w4a8", *args]) == 0
    ev = ["eval", "--model", str(ck), "--tasks", "sqa", "--limit", "2", "--max-new-tokens", "2", "--output",
          str(tmp_path / "out"), "--no-progress"]
    assert main(ev) == 0
    store = Store(tmp_path / "out" / "harness.db")
    first = list(store.rows())
    shutil.rmtree(ck)
    assert main(["quantize", "--method", "rtn", "--bits", "w4a8", "--quantize", "lm", *args]) == 0  # 14 layers now
    assert main(ev) == 0
    rows = list(store.rows())
    assert len(rows) == 1 and rows[0].cell_id != first[0].cell_id
    assert rows[0].settings["quantized_modules"] < first[0].settings["quantized_modules"]


def test_folder_fingerprint_ignores_provenance_keys_and_caches_by_stat(tmp_path):
    d1, d2 = tmp_path / "a", tmp_path / "b"
    for d, where in ((d1, "/x"), (d2, "/elsewhere")):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"_name_or_path": where, "hidden_size": 8,
                                                   "transformers_version": "5.0"}))
        (d / "model.safetensors").write_bytes(b"\x00" * 64)
    assert folder_fingerprint(d1) == folder_fingerprint(d2)
    (d2 / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert folder_fingerprint(d1) != folder_fingerprint(d2)


def _row(**kw) -> ResultRow:
    base = dict(cell_id="c1", run_id="r", model="m", method="rtn", bits="w4a4", task="sqa", split="test", seed=0,
                n_samples=3, execution="simulated", metrics={"acc": 50.0}, settings={"primary_metric": "acc"})
    return ResultRow(**(base | kw))


def test_store_refuses_nan_and_empty_rows(tmp_path):
    store = Store(tmp_path / "s.db")
    with pytest.raises(HarnessError, match="no samples"):
        store.put(_row(n_samples=0))
    with pytest.raises(HarnessError, match="primary metric acc"):
        store.put(_row(metrics={"acc": float("nan")}))
    store.put(_row())
    assert [r.cell_id for r in store.rows()] == ["c1"]


def test_store_survives_corrupt_rows_and_refuses_foreign_files(tmp_path, capsys):
    store = Store(tmp_path / "s.db")
    store.put(_row())
    store.put(_row(cell_id="c2"))
    con = sqlite3.connect(tmp_path / "s.db")
    con.execute("UPDATE results SET metrics = '[1, 2]' WHERE cell_id = 'c2'")
    con.commit()
    con.close()
    assert [r.cell_id for r in store.rows()] == ["c1"]
    assert "row c2 cannot be read" in capsys.readouterr().err
    (tmp_path / "text.db").write_text("not a database at all, just text " * 50)
    with pytest.raises(HarnessError, match="not a harness results store"):
        Store(tmp_path / "text.db")
    with pytest.raises(HarnessError, match="is a folder"):
        Store(tmp_path)
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE things (x INTEGER)")
    other.commit()
    other.close()
    with pytest.raises(HarnessError, match="other tables"):
        Store(tmp_path / "other.db")


def test_an_old_store_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)  # the schema before cell keys (user_version 0)
    con.executescript("""CREATE TABLE results (cell_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, created TEXT NOT NULL,
        model TEXT NOT NULL, model_fingerprint TEXT, method TEXT NOT NULL, bits TEXT NOT NULL, task TEXT NOT NULL,
        split TEXT NOT NULL, shots INTEGER NOT NULL DEFAULT 0, seed INTEGER NOT NULL, n_samples INTEGER NOT NULL,
        sample_limit INTEGER, scoring TEXT, execution TEXT NOT NULL, metrics TEXT NOT NULL, measurements TEXT NOT
        NULL, search_cost TEXT NOT NULL, settings TEXT NOT NULL, describe TEXT, environment TEXT NOT NULL,
        data_fingerprint TEXT);""")
    con.execute("INSERT INTO results VALUES ('old', 'r', '2026-01-01', 'm', NULL, 'rtn', 'w4a4', 'sqa', 'test', 0, 0, "
                "5, NULL, NULL, 'simulated', '{\"acc\": 40.0}', '{}', '{}', '{}', NULL, '{}', NULL)")
    con.commit()
    con.close()
    store = Store(path)
    rows = list(store.rows())
    assert [r.cell_id for r in rows] == ["old"] and rows[0].metrics["acc"] == 40.0 and rows[0].cell_key is None
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] >= 2


def test_sample_keys_written_twice_count_once(tmp_path):
    log = SampleLog(tmp_path / "c.jsonl")
    log.append([{"key": "0:a", "id": "a", "trial": 0, "record": {"correct": True}}])
    log.append([{"key": "0:a", "id": "a", "trial": 0, "record": {"correct": False}},
                {"key": "0:b", "id": "b", "trial": 0, "record": {"correct": False}}])
    assert [(e["key"], e["record"]["correct"]) for e in log.read()] == [("0:a", True), ("0:b", False)]


def test_two_processes_on_one_cell_count_each_sample_once(tiny_model_dir, tmp_path):
    args = [sys.executable, "-m", "qvlm_harness", "run", "--methods", "fp32", "--tasks", "sqa", "--limit", "6",
            "--model", str(tiny_model_dir), "--output", str(tmp_path / "out"), "--max-new-tokens", "2",
            "--batch-size", "1", "--threads", "1", "--no-progress"]
    procs = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    rows = list(Store(tmp_path / "out" / "harness.db").rows())
    assert len(rows) == 1 and rows[0].n_samples == 6
    logs = list((tmp_path / "out").glob("*/samples/*.jsonl"))
    lines = [json.loads(x) for x in logs[0].read_text().splitlines()]
    assert len(lines) == 6 and len({x["key"] for x in lines}) == 6  # the second process found the cell done
    assert rows[0].metrics["n_acc"] == 6  # the metric counts each sample once


def _cell_ids(tiny_model_dir, tmp_path, *, method="rtn", bits="w4a4", task="sqa", dtype="fp32") -> set[str]:
    ids = set()
    for bs, th in ((1, 1), (8, 1), (1, 2)):
        plan = make_plan(RunSpec(methods=[method], tasks=[task], bits=[QuantSpec.parse(bits)], limit=2, dtype=dtype,
                                 model=str(tiny_model_dir), output=tmp_path, batch_size=bs, threads=th))
        ids.add(plan.cell_id(plan.cells[0]))
    return ids


def test_batch_size_and_threads_leave_the_identity_where_the_answer_path_is_invariant(tiny_model_dir, tmp_path):
    assert len(_cell_ids(tiny_model_dir, tmp_path)) == 1  # fp32, per-token activations: invariant
    assert len(_cell_ids(tiny_model_dir, tmp_path, method="fp32")) == 1


def test_batch_size_and_threads_join_the_identity_where_results_can_still_change(tiny_model_dir, tmp_path):
    assert len(_cell_ids(tiny_model_dir, tmp_path, dtype="bf16")) == 3  # bf16 GEMMs are not row-invariant
    assert len(_cell_ids(tiny_model_dir, tmp_path, method="bf16")) == 3  # the baseline computes in bf16
    # one activation range over the whole batch: batch size matters, threads do not
    assert len(_cell_ids(tiny_model_dir, tmp_path, bits="w4a8-tensor-dynamic")) == 2
