"""scripts/gpu_check.sh without a GPU: it stops at the detection step, says so, exits 0 and starts nothing heavy;
and its failure path (summary files, the failed steps printed, exit 1) works without running any of them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def _run(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=60,
                          env=os.environ | env)


def test_without_a_gpu_it_says_so_and_exits_0_before_any_heavy_step(tmp_path):
    out = tmp_path / "check"
    r = _run(out, GPU_CHECK_NVIDIA_SMI=str(tmp_path / "no-such-nvidia-smi"))
    assert r.returncode == 0, r.stderr
    assert "no GPU present" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "no GPU" and summary["failed"] == []
    assert [s["step"] for s in summary["steps"]] == ["gpu"] and summary["steps"][0]["status"] == "absent"
    assert "no GPU" in (out / "summary.md").read_text()
    for heavy in ("setup", "tests", "run-rtn", "bench"):  # never started: no log, no output folder
        assert not (out / "logs" / f"{heavy}.log").exists()
    assert not (out / "runs").exists() and not (out / "bench").exists()
    assert "gpu_check: setup" not in r.stdout


def test_a_step_that_does_not_fit_the_budget_is_reported_failed(tmp_path):
    """A fake nvidia-smi that lists a GPU and no time budget: setup is not started, the summary says why, the
    failed step is printed and the exit code is 1."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "check"
    r = _run(out, GPU_CHECK_NVIDIA_SMI=str(fake), GPU_CHECK_BUDGET_S="0")
    assert r.returncode == 1
    assert "FAILED steps: setup" in r.stdout and "time budget exhausted" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["setup"]
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("gpu", "ok"), ("setup", "failed")]
    assert "Fake GPU" in summary["steps"][0]["detail"]
    assert not (out / "logs" / "setup.log").exists()


def test_usage_error_exits_2(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
