"""The unit of work is self-contained (what a Ray task runs) and a Ray run equals a local run."""

from __future__ import annotations

import json

import pytest

from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.executors import split_by_task
from qvlm_harness.runner import Cell, GroupJob, Runner, resolve_model, run_job


def spec_for(tiny_model_dir, out, **kw) -> RunSpec:
    base = dict(methods=["rtn"], tasks=["hm"], bits=QuantSpec.parse_list("w8a8,w4a4"), model=str(tiny_model_dir),
                limit=6, output=out, batch_size=4, threads=1)
    return RunSpec(**(base | kw))


def comparable(row) -> dict:
    """What must not depend on where a job ran (timings, RSS, run id and environment may)."""
    return {"cell_id": row.cell_id, "metrics": row.metrics, "n_samples": row.n_samples, "execution": row.execution,
            "model_fingerprint": row.model_fingerprint, "data_fingerprint": row.data_fingerprint,
            "weights": (row.measurements["weight_mb_stored"], row.measurements["weight_mb_packed"]),
            "settings": {k: v for k, v in row.settings.items() if k != "samples_log"}}


def sample_records(out) -> dict:
    return {p.name: sorted((json.loads(line)["key"], json.dumps(json.loads(line)["record"], sort_keys=True))
                           for line in p.read_text().splitlines()) for p in out.glob("*/samples/*.jsonl")}


def test_split_by_task_gives_one_job_per_method_bits_task():
    w8 = QuantSpec.parse("w8a8")
    cells = (Cell("rtn", w8, "sqa"), Cell("rtn", w8, "hm", 0), Cell("rtn", w8, "hm", 4))
    jobs = split_by_task([GroupJob("rtn", w8, None, cells)])
    assert [(j.method, j.spec, [c.task for c in j.cells]) for j in jobs] == [("rtn", w8, ["sqa"]),
                                                                               ("rtn", w8, ["hm", "hm"])]


def test_run_job_alone_equals_the_local_path(tiny_model_dir, tmp_path):
    local = Runner(spec_for(tiny_model_dir, tmp_path / "local"), log=lambda m: None, progress=False).run()
    spec = spec_for(tiny_model_dir, tmp_path / "job")
    runner = Runner(spec, log=lambda m: None, progress=False)
    cells = runner.plan()
    model_id, path = resolve_model(spec.model)
    rows = []
    for bits in ("w8a8", "w4a4"):  # each job in a fresh runner, as on a worker
        job = GroupJob("rtn", QuantSpec.parse(bits), None, tuple(c for c in cells if c.bits == bits))
        rows += run_job(spec, job, model_id=model_id, model_path=path, run_id="r", executor="test")
    assert [comparable(r) for r in rows] == [comparable(r) for r in local.rows]
    assert rows[0].environment["executor"] == "test" and local.rows[0].environment["executor"] == "local"
    for row in rows + local.rows:  # what makes a row reproducible is recorded wherever it ran
        env = row.environment
        assert {"harness_version", "git", "python", "device", "threads", "hostname"} <= set(env)
        assert env["packages"]["torch"] and env["packages"]["transformers"] and env["threads"] == 1
        assert row.model_fingerprint and row.data_fingerprint and row.seed == 0
    assert sample_records(tmp_path / "job") == sample_records(tmp_path / "local")


@pytest.mark.slow
def test_ray_run_equals_local_run(tiny_model_dir, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'qvlm-harness[ray]'")
    from qvlm_harness.executors import RayExecutor
    from qvlm_harness.store import Store

    local = Runner(spec_for(tiny_model_dir, tmp_path / "local"), log=lambda m: None, progress=False).run()
    spec = spec_for(tiny_model_dir, tmp_path / "ray")
    result = Runner(spec, log=lambda m: None, progress=False, executor=RayExecutor(local_cpus=2)).run()
    assert not ray.is_initialized()  # the local instance the run started is shut down
    assert result.computed == 2
    assert [comparable(r) for r in result.rows] == [comparable(r) for r in local.rows]
    assert {r.environment["executor"] for r in result.rows} == {"ray"}
    assert len(list(Store(spec.store_path).rows())) == 2  # rows flowed into the driver's store
    assert sample_records(tmp_path / "ray") == sample_records(tmp_path / "local")
