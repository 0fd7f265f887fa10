"""End-to-end runs on a tiny random Llava: grid expansion, store rows, tables, per-sample logs, and resume."""

from __future__ import annotations

import json
import sqlite3

import pytest

from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.evaluate import control_images, demonstrations
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.plan import make_plan
from qvlm_harness.runner import Runner
from qvlm_harness.store import Store


def make_spec(tiny_model_dir, tmp_path, **kw) -> RunSpec:
    base = dict(methods=["fp32", "rtn"], tasks=["sqa"], bits=QuantSpec.parse_list("w8a8,w4a4"),
                model=str(tiny_model_dir), limit=6, output=tmp_path / "out", batch_size=4, max_new_tokens=4)
    return RunSpec(**(base | kw))


def test_grid_store_tables_and_sample_logs(tiny_model_dir, tmp_path):
    spec = make_spec(tiny_model_dir, tmp_path)
    result = Runner(spec, log=lambda m: None, progress=False).run()
    # fp32 ignores --bits: 1 cell; rtn: 2 cells
    assert [(r.method, r.bits) for r in result.rows] == [("fp32", "fp"), ("rtn", "w8a8"), ("rtn", "w4a4")]
    assert result.computed == 3
    rows = list(Store(spec.store_path).rows())
    assert len(rows) == 3
    rtn = next(r for r in rows if r.bits == "w4a4")
    assert rtn.execution == "simulated" and rtn.n_samples == 6
    assert {"acc", "NAT", "IMG", "parse_fail"} <= set(rtn.metrics)
    assert rtn.measurements["weight_mb_packed"] < rtn.measurements["weight_mb_stored"]
    assert rtn.environment["threads"] >= 1 and rtn.model_fingerprint
    fp = next(r for r in rows if r.method == "fp32")
    assert fp.execution == "float"
    logs = list((spec.output).glob("*/samples/*.jsonl"))
    assert len(logs) == 3
    lines = [json.loads(x) for x in logs[0].read_text().splitlines()]
    assert len(lines) == 6 and {"prompt", "record", "prefill_s"} <= set(lines[0])
    assert "Answer with the option's letter" in lines[0]["prompt"]


def test_rerun_reuses_every_stored_cell(tiny_model_dir, tmp_path, monkeypatch):
    spec = make_spec(tiny_model_dir, tmp_path, methods=["rtn"], bits=QuantSpec.parse_list("w8a8"))
    first = Runner(spec, log=lambda m: None, progress=False).run()
    loads = []
    monkeypatch.setattr(LlavaAdapter, "load", classmethod(lambda cls, *a, **k: loads.append(a)))
    second = Runner(spec, log=lambda m: None, progress=False).run()
    assert loads == []  # nothing to compute: the model is not even loaded
    assert second.computed == 0 and second.reused == 1
    assert second.rows[0].metrics == first.rows[0].metrics


def test_interrupted_cell_resumes_sample_by_sample(tiny_model_dir, tmp_path, monkeypatch):
    spec = make_spec(tiny_model_dir, tmp_path, methods=["rtn"], bits=QuantSpec.parse_list("w4a4"), limit=10,
                     batch_size=2)
    answered: list[str] = []
    real_answer = LlavaAdapter.answer

    def dying_answer(self, requests, batch_size=8):
        if len(answered) >= 6:
            raise KeyboardInterrupt  # the user pressed Ctrl-C after three batches
        answered.extend(r.sample_id for r in requests)
        return real_answer(self, requests, batch_size)

    monkeypatch.setattr(LlavaAdapter, "answer", dying_answer)
    with pytest.raises(KeyboardInterrupt):
        Runner(spec, log=lambda m: None, progress=False).run()
    assert not list(Store(spec.store_path).rows())  # the cell did not finish
    assert len(answered) == 6

    resumed: list[str] = []

    def counting_answer(self, requests, batch_size=8):
        resumed.extend(r.sample_id for r in requests)
        return real_answer(self, requests, batch_size)

    monkeypatch.setattr(LlavaAdapter, "answer", counting_answer)
    result = Runner(spec, log=lambda m: None, progress=False).run()
    assert len(resumed) == 4 and not set(resumed) & set(answered)  # only the 4 unfinished samples
    assert result.rows[0].n_samples == 10

    # and the resumed result equals an uninterrupted run
    monkeypatch.setattr(LlavaAdapter, "answer", real_answer)
    clean = make_spec(tiny_model_dir, tmp_path / "clean", methods=["rtn"], bits=QuantSpec.parse_list("w4a4"),
                      limit=10, batch_size=2)
    fresh = Runner(clean, log=lambda m: None, progress=False).run()
    assert fresh.rows[0].metrics == result.rows[0].metrics


def test_same_seed_same_results(tiny_model_dir, tmp_path):
    a = Runner(make_spec(tiny_model_dir, tmp_path / "a", methods=["rtn"], bits=QuantSpec.parse_list("w4a4"),
                         tasks=["hm"], shots=(0, 4)), log=lambda m: None, progress=False).run()
    b = Runner(make_spec(tiny_model_dir, tmp_path / "b", methods=["rtn"], bits=QuantSpec.parse_list("w4a4"),
                         tasks=["hm"], shots=(0, 4)), log=lambda m: None, progress=False).run()
    assert [r.metrics for r in a.rows] == [r.metrics for r in b.rows]
    assert [r.shots for r in a.rows] == [0, 4]


def test_few_shot_demos_never_include_the_query(tiny_model_dir, tmp_path):
    spec = make_spec(tiny_model_dir, tmp_path, methods=["fp32"], tasks=["hm"], shots=(8,), trials=2, limit=8,
                     data_dir=None)
    plan = make_plan(spec)
    task = plan.tasks["hm"]
    pool = task.load("dev_seen")  # demos drawn from the same split as the queries: the worst case for leaks
    for sample in plan.samples("hm"):
        for trial in range(2):
            demos = demonstrations(sample, pool, 8, trial, spec.seed)
            assert sample.id not in {d.id for d in demos} and len(demos) == 8
    # seeded per trial: same demos on a second call, different across trials
    s0 = plan.samples("hm")[0]
    assert demonstrations(s0, pool, 8, 0, spec.seed) == demonstrations(s0, pool, 8, 0, spec.seed)
    assert demonstrations(s0, pool, 8, 0, spec.seed) != demonstrations(s0, pool, 8, 1, spec.seed)


def test_store_survives_and_has_one_row_per_cell(tiny_model_dir, tmp_path):
    spec = make_spec(tiny_model_dir, tmp_path, methods=["rtn"], bits=QuantSpec.parse_list("w8a8"))
    Runner(spec, log=lambda m: None, progress=False).run()
    Runner(spec, log=lambda m: None, progress=False).run()
    con = sqlite3.connect(spec.store_path)
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1


def test_shuffled_image_control_is_a_derangement_and_a_separate_cell(tiny_model_dir, tmp_path):
    spec = make_spec(tiny_model_dir, tmp_path, methods=["fp32"], limit=30, image_control="shuffle")
    plan = make_plan(spec)
    samples = plan.samples("sqa")
    swap = control_images(samples, spec.image_control, spec.seed)
    own = {x.id: x.image for x in samples if x.image is not None}
    assert set(swap) == set(own) and len(own) >= 2
    assert all(swap[i] != own[i] for i in own)  # no question keeps its own image
    assert sorted(map(str, swap.values())) == sorted(map(str, own.values()))  # same images, permuted
    plain = make_spec(tiny_model_dir, tmp_path, methods=["fp32"], limit=30)
    cell = plan.cells[0]
    other = make_plan(plain)
    assert plan.cell_id(cell) != other.cell_id(cell)
