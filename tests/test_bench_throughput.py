"""`harness bench --throughput` on the tiny Llava: a throughput.json whose figures agree with each other, a profile
whose executed work is what the batches really ran, and bad flags as one line with exit 2. No absolute times are
asserted: the cores are shared."""

from __future__ import annotations

import json
import math

import pytest

from qvlm_harness.gemm_rate import GemmShape, mix_rate, time_gemm
from tests.test_cli import one_line_error, run_cli


def _written(out: str, name: str):
    from pathlib import Path

    listed = out.rsplit("written: ", 1)[1].strip().split(", ")
    return next(Path(p) for p in listed if p.endswith(name))


def test_throughput_json_is_consistent(capsys, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QVLM_HARNESS_NO_CPP", "1")  # plain torch around torch._int_mm: no compiler needed
    code, out, err = run_cli(capsys, "bench", "--throughput", "--model", str(tiny_model_dir), "--methods", "fp32,rtn",
                             "--bits", "w8a8", "--samples", "3", "--batch-sizes", "1,2", "--rounds", "1",
                             "--new-tokens", "4", "--output", str(tmp_path))
    assert code == 0, err
    data = json.loads(_written(out, "throughput.json").read_text())
    assert "Efficiency" in _written(out, "throughput.md").read_text()
    env, rows = data["env"], data["rows"]
    assert env["samples"] == 3 and env["task"] == "sqa" and env["threads"] == 1
    assert len(env["loadavg_before"]) == 3 and len(env["loadavg_after"]) == 3
    assert {(r["method"], r["batch"]) for r in rows} == {("fp32", 1), ("rtn", 1), ("fp32", 2), ("rtn", 2)}
    for r in rows:
        for key in ("samples_per_s", "limit_samples_per_s", "efficiency", "cpu_efficiency", "prompt_tokens_per_s",
                    "flops_per_sample", "rate_gflops", "cpu_share"):
            assert r[key] > 0 and math.isfinite(r[key]), key
        assert r["efficiency"] == pytest.approx(r["samples_per_s"] / r["limit_samples_per_s"], rel=1e-12)
        assert r["limit_samples_per_s"] == pytest.approx(r["rate_gflops"] * 1e9 / r["flops_per_sample"], rel=1e-9)
        assert r["samples_per_s"] == pytest.approx(r["samples"] / r["wall_s"], rel=1e-12)
        assert r["prompt_tokens_per_s"] / r["samples_per_s"] == pytest.approx(env["mean_prompt_tokens"], rel=1e-9)
        assert r["generated_tokens_per_s"] / r["samples_per_s"] == pytest.approx(r["generated_tokens_per_sample"])
        assert 0 <= r["generated_tokens_per_sample"] <= 4
        assert sum(r["flops_by_part"].values()) == pytest.approx(r["flops_per_sample"], rel=1e-12)
        assert r["batch"] == r["gemm_rows"]["head"] and r["threads"] == 1
        assert all(v > 0 for v in r["gemm_gflops"].values()) and r["gemm_gflops"].keys() == r["gemm_dtypes"].keys()
        assert r["efficiency_rounds"] == [pytest.approx(r["efficiency"], rel=1e-12)]  # one round: its own figure
        ref = next(x for x in rows if x["method"] == "fp32" and x["batch"] == r["batch"])
        assert r["x_fp32"] == pytest.approx(r["samples_per_s"] / ref["samples_per_s"], rel=1e-12)
    rtn = next(r for r in rows if r["method"] == "rtn")
    assert rtn["exec"] == "real" and rtn["gemm_dtypes"]["prefill"] == "int8" and rtn["gemm_dtypes"]["head"] == "fp32"
    assert next(r for r in rows if r["method"] == "fp32")["gemm_dtypes"]["prefill"] == "fp32"


def test_throughput_profile_counts_the_work_the_batches_ran(capsys, tmp_path, tiny_model_dir):
    """Batches are padding-free (same-length prompts only): the profile's executed LM positions, counted from the
    batches the model ran, equal the samples' own lengths (encoded alone, independently), which would exceed them
    if any batch padded; its time shares add up to the wall."""
    from qvlm_harness import plugins
    from qvlm_harness.models.llava import LlavaAdapter
    from qvlm_harness.throughput import Workload, select_samples

    code, out, err = run_cli(capsys, "bench", "--throughput", "--profile", "--model", str(tiny_model_dir),
                             "--methods", "fp32", "--samples", "4", "--batch-sizes", "2", "--rounds", "1",
                             "--new-tokens", "3", "--output", str(tmp_path))
    assert code == 0, err
    profile = json.loads(_written(out, "throughput.json").read_text())["profiles"][0]
    assert _written(out, "profile_throughput_fp32_b2.txt").read_text().startswith("fp32, batch 2")
    task = plugins.tasks.get("sqa")()
    workload = Workload(task, select_samples(task, 4, seed=0), "generate", 3)
    adapter = LlavaAdapter.load(tiny_model_dir)
    alone = [adapter.encode([workload.request(s)])["input_ids"].numel() for s in workload.samples]
    key = "LM prompt positions"
    assert profile["executed"][key] == pytest.approx(sum(alone) / 4)
    assert profile["required"][key] == pytest.approx(sum(alone) / 4)
    assert profile["executed"]["GFLOP total"] >= profile["required"]["GFLOP total"] > 0
    assert sum(profile["breakdown"].values()) == pytest.approx(profile["wall_ms_per_sample"], rel=0.05)
    assert all(v >= 0 for v in profile["breakdown"].values())
    assert any(k.startswith("prefill: GEMM") for k in profile["breakdown"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--samples", "5"], "--samples applies to --throughput"),
        (["--throughput", "--samples", "0"], "positive whole number"),
        (["--throughput", "--samples", "many"], "positive whole number"),
        (["--throughput", "--execution", "fast"], "--execution takes packed or simulated"),
        (["--throughput", "--scoring", "ppl"], "--scoring takes generate or loglik"),
        (["--throughput", "--task", "scienceqaa"], "Did you mean"),
        (["--throughput", "--samples", "100000"], "use --samples"),
        (["--throughput", "--methods", "rnt"], "Did you mean 'rtn'"),
        (["--throughput", "--model", "/nonexistent/model"], "does not exist"),
        (["--throughput", "--batch-sizes", "0"], "must be positive"),
    ],
)
def test_bad_throughput_flags_are_one_line_exit_2(capsys, tmp_path, args, needle):
    """Found before any model is loaded (the default model is never built here)."""
    model = [] if "--model" in args else ["--model", "tiny"]
    code, _, err = run_cli(capsys, "bench", *args, *model, "--output", str(tmp_path))
    assert code == 2
    assert needle in one_line_error(err)
    assert "Traceback" not in err


def test_gemm_rate_is_flops_over_measured_time():
    shapes = [GemmShape(8, 64, 32, d) for d in ("fp32", "bf16", "int8")]
    timings = [time_gemm(s, min_repeats=2, min_seconds=0.0) for s in shapes]
    assert all(t.wall_s > 0 and t.cpu_s >= 0 for t in timings)
    fake = {shapes[0]: 2.0, shapes[1]: 0.5}
    expected = (3 * shapes[0].flops + shapes[1].flops) / (3 * 2.0 + 0.5)
    assert mix_rate([(shapes[0], 3), (shapes[1], 1)], fake) == pytest.approx(expected)
