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
    out = tmp_path / "check"
    r = _run(out, GPU_CHECK_NVIDIA_SMI=str(_fake_gpu(tmp_path)), GPU_CHECK_BUDGET_S="0")
    assert r.returncode == 1
    assert "FAILED steps: setup" in r.stdout and "time budget exhausted" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["setup"]
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("gpu", "ok"), ("setup", "failed")]
    assert "Fake GPU" in summary["steps"][0]["detail"]
    assert not (out / "logs" / "setup.log").exists()


def _fake_gpu(tmp_path: Path) -> Path:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


def test_dry_run_walks_every_step_with_the_commands_the_brief_asks_for(tmp_path):
    """The plumbing after detection (a GPU session is too rare to find a shell bug in): every step is recorded
    ok, and the logged commands are the cuda tests, one run per method at three bit-widths on CUDA, and bench."""
    out = tmp_path / "check"
    r = _run(out, GPU_CHECK_NVIDIA_SMI=str(_fake_gpu(tmp_path)), GPU_CHECK_DRY_RUN="1")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = [s["step"] for s in summary["steps"]]
    runs = [s for s in steps if s.startswith("run-")]
    assert steps[:6] == ["gpu", "setup", "torch", "model", "tests", "run-fp32,bf16"] and steps[-1] == "bench"
    assert len(runs) == 10 and summary["verdict"] == "ok" and summary["failed"] == []
    assert "-m cuda" in (out / "logs" / "tests.log").read_text()
    for name in runs:
        cmd = (out / "logs" / f"{name}.log").read_text()
        assert f"--methods {name[4:]} " in cmd and "--bits w4a16,w8a8,w4a4" in cmd
        assert "--limit 64" in cmd and "--device cuda" in cmd and f"--output {out}/runs" in cmd
    assert "bench --device cuda" in (out / "logs" / "bench.log").read_text()
    assert not (out / "runs").exists()  # nothing ran
    _check_commands_parse(out, runs)


def _check_commands_parse(out: Path, runs: list[str]) -> None:
    """The logged commands parse, and every --method-option is an option of its method (a typo would cost the
    GPU session a failed run)."""
    from qvlm_harness import plugins
    from qvlm_harness.cli import build_parser
    from qvlm_harness.commands.bench import bench_config
    from qvlm_harness.commands.common import run_spec_from_args

    parser = build_parser()
    for name in runs:
        argv = (out / "logs" / f"{name}.log").read_text().split()[1:]
        spec = run_spec_from_args(parser.parse_args(argv))
        assert spec.device == "cuda" and spec.limit == 64 and [b.tag for b in spec.bits] == ["w4a16", "w8a8", "w4a4"]
        for method, options in spec.method_options.items():
            plugins.methods.get(method)(**options)  # unknown or out-of-range options raise
    cfg = bench_config(parser.parse_args((out / "logs" / "bench.log").read_text().split()[1:]))
    assert cfg.device == "cuda" and not cfg.rss


def test_usage_error_exits_2(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
