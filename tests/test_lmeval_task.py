"""`lmeval:<task>` inside the harness, and `qvlm-harness` inside lm-eval, on the offline YAML tasks in
tests/data/lmeval (12 ScienceQA items mirrored from the embedded set): both entry points agree with each other and
with the harness's own `sqa` scoring of the same items, per sample and in aggregate; resume works per document."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra `lmeval` (tox installs it): "
                    "pip install -c constraints.txt -e '.[lmeval]'")

from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.errors import HarnessError, UnknownNameError
from qvlm_harness.report import main_table
from qvlm_harness.runner import Runner
from qvlm_harness.task import Request
from qvlm_harness.tasks.lmeval import LMEvalTask

DATA = Path(__file__).parent / "data" / "lmeval"
ROOT = Path(__file__).resolve().parents[1]
PIDS = [json.loads(line)["pid"] for line in (DATA / "sqa_mini_test.jsonl").read_text().splitlines()]


def spec(tiny_model_dir, out: Path, tasks: list[str], **kw) -> RunSpec:
    opts = {"include_path": [str(DATA)]}
    base = dict(methods=["rtn"], tasks=tasks, bits=[QuantSpec.parse("w4a4")], model=str(tiny_model_dir),
                output=out, data_dir=DATA, batch_size=4, max_new_tokens=16,
                task_options={t: opts for t in tasks if t.startswith("lmeval:")})
    return RunSpec(**(base | kw))


def native_has_image(pid: str) -> bool:
    return bool(json.loads((DATA / "sqa" / "problems.json").read_text())[pid]["image"])


def sample_log(out: Path, task: str) -> list[dict]:
    safe = task.replace(":", "_")
    (path,) = [p for p in out.glob("*/samples/*.jsonl") if f"-{safe}-" in p.name]
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def mc_run(tiny_model_dir, tmp_path_factory):
    """One run: native sqa (log-likelihood scoring) beside the mirrored lm-eval multiple-choice task."""
    out = tmp_path_factory.mktemp("mc")
    s = spec(tiny_model_dir, out, ["sqa", "lmeval:qvlm_sqa_mc"], scoring="loglik")
    return Runner(s, log=lambda m: None, progress=False).run(), out


def test_lmeval_task_agrees_with_native_sqa_per_sample(mc_run, tiny_adapter):
    result, out = mc_run
    rows = {r.task: r for r in result.rows}
    native, bridged = rows["sqa"], rows["lmeval:qvlm_sqa_mc"]
    assert bridged.n_samples == native.n_samples == 12
    assert bridged.metrics["acc,none"] == pytest.approx(native.metrics["acc"] / 100)
    assert bridged.scoring == "lmeval" and bridged.execution == "simulated"
    native_log = {e["id"]: e for e in sample_log(out, "sqa")}
    for entry in sample_log(out, "lmeval:qvlm_sqa_mc"):
        pid = PIDS[int(entry["id"])]
        assert entry["record"]["metrics"]["acc,none"] == float(native_log[pid]["record"]["correct"])
        has_image = bool(native_log[pid]["record"]["image"])
        native_prompt = tiny_adapter.render(Request(pid, native_log[pid]["prompt"], b"" if has_image else None))
        assert entry["prompt"] == native_prompt  # lm-eval's context is exactly what the native task renders
    # the standard error is lm-eval's mean_stderr: sample std / sqrt(n)
    acc = bridged.metrics["acc,none"]
    assert bridged.metrics["acc_stderr,none"] == pytest.approx((acc * (1 - acc) * 12 / 11) ** 0.5 / 12 ** 0.5)


def test_lmeval_task_shares_the_main_table(mc_run):
    result, _ = mc_run
    table = main_table(result.rows)
    assert list(table["ScienceQA"]) == [result.rows[0].metrics["acc"]]
    assert list(table["lmeval:qvlm_sqa_mc"]) == [result.rows[1].metrics["acc,none"]]


def test_compare_rebuilds_lmeval_tasks_from_the_stored_include_path(mc_run):
    """`harness compare` recomputes lm-eval aggregates on bootstrap resamples: the task is rebuilt from the row's
    recorded --lmeval-include folder, and a run compared with itself passes with zero differences."""
    from qvlm_harness.regression import cells_from_store, compare
    from qvlm_harness.store import Store

    cells = cells_from_store(Store(mc_run[1] / "harness.db"))
    (cell,) = [c for c in cells if c.task == "lmeval:qvlm_sqa_mc"]
    assert cell.info["task_options"] == {"include_path": [str(DATA)]}
    comp = compare(cells, cells, n_resamples=50)
    checks = [c for c in comp.checks if c.metric == "acc,none"]
    assert comp.ok and len(checks) == 1 and checks[0].gated and checks[0].current == checks[0].baseline


def test_shuffled_image_control_swaps_the_same_images_as_the_native_task(mc_run, tiny_model_dir, tmp_path):
    s = spec(tiny_model_dir, tmp_path, ["sqa", "lmeval:qvlm_sqa_mc"], scoring="loglik", image_control="shuffle")
    rows = {r.task: r for r in Runner(s, log=lambda m: None, progress=False).run().rows}
    assert rows["lmeval:qvlm_sqa_mc"].settings["image_control"] == "shuffle"
    native = {e["id"]: e["record"]["correct"] for e in sample_log(tmp_path, "sqa")}
    shuffled = {int(e["id"]): e["record"] for e in sample_log(tmp_path, "lmeval:qvlm_sqa_mc")}
    assert {PIDS[i]: r["metrics"]["acc,none"] for i, r in shuffled.items()} == {p: float(c) for p, c in native.items()}
    original = {int(e["id"]): e["record"] for e in sample_log(mc_run[1], "lmeval:qvlm_sqa_mc")}
    changed = {i for i in original if original[i]["resps"] != shuffled[i]["resps"]}
    with_image = {i for i, pid in enumerate(PIDS) if native_has_image(pid)}
    assert changed == with_image  # exactly the image documents saw another image


def test_generation_task_agrees_with_native_generation(tiny_model_dir, tmp_path):
    s = spec(tiny_model_dir, tmp_path, ["sqa", "lmeval:qvlm_sqa_gen"], limit=5, batch_size=1)
    rows = {r.task: r for r in Runner(s, log=lambda m: None, progress=False).run().rows}
    assert rows["lmeval:qvlm_sqa_gen"].metrics["acc,none"] == pytest.approx(rows["sqa"].metrics["acc"] / 100)
    assert rows["lmeval:qvlm_sqa_gen"].metrics["parse_fail,none"] == pytest.approx(rows["sqa"].metrics["parse_fail"]
                                                                                    / 100)
    native = {e["id"]: e["record"]["raw"] for e in sample_log(tmp_path, "sqa")}
    bridged = {PIDS[int(e["id"])]: e["record"]["resps"][0][0] for e in sample_log(tmp_path, "lmeval:qvlm_sqa_gen")}
    assert len(native) == 5 and sorted(native) == sorted(bridged)  # the same seeded subset of 5 documents
    assert all(bridged[k].strip() == native[k] for k in native)


def test_interrupted_lmeval_cell_resumes_document_by_document(tiny_model_dir, tmp_path, monkeypatch):
    s = spec(tiny_model_dir, tmp_path, ["lmeval:qvlm_sqa_mc"], limit=8, batch_size=2)
    answered: list[str] = []
    real = LMEvalTask.answer

    def dying(self, adapter, requests, batch_size=8):
        if len(answered) >= 4:
            raise KeyboardInterrupt
        answered.extend(r.sample_id for r in requests)
        return real(self, adapter, requests, batch_size)

    monkeypatch.setattr(LMEvalTask, "answer", dying)
    with pytest.raises(KeyboardInterrupt):
        Runner(s, log=lambda m: None, progress=False).run()
    resumed: list[str] = []

    def counting(self, adapter, requests, batch_size=8):
        resumed.extend(r.sample_id for r in requests)
        return real(self, adapter, requests, batch_size)

    monkeypatch.setattr(LMEvalTask, "answer", counting)
    (row,) = Runner(s, log=lambda m: None, progress=False).run().rows
    assert len(answered) == 4 and len(resumed) == 4 and not set(answered) & set(resumed)
    assert row.n_samples == 8 and 0.0 <= row.metrics["acc,none"] <= 1.0


def test_lmeval_train_split_feeds_calibration():
    task = LMEvalTask("qvlm_sqa_mc", include_path=str(DATA))
    calib = CalibrationSet.from_task(task, 3, seed=0)
    assert len(calib) == 3 and all(r.image is not None for r in calib.requests)  # train items all have images
    train = [json.loads(line) for line in (DATA / "sqa_mini_train.jsonl").read_text().splitlines()]
    letters = {"ABCD"[row["answer"]] for row in train}
    assert set(calib.targets) <= letters
    assert all(r.prompt.startswith("<image>") and r.prompt.endswith("directly.") for r in calib.requests)


def test_lmeval_errors_name_the_fix(tmp_path):
    with pytest.raises(UnknownNameError, match="Did you mean 'lmeval:qvlm_sqa_mc'"):
        _ = LMEvalTask("qvlm_sqa_mcc", include_path=str(DATA)).lm_task
    with pytest.raises(HarnessError, match="no such folder"):
        LMEvalTask("x", include_path=str(tmp_path / "missing"))
    (tmp_path / "group.yaml").write_text("group: qvlm_pair\ntask: [qvlm_sqa_mc, qvlm_sqa_gen]\n")
    for f in DATA.glob("*"):
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(HarnessError, match="one by one"):
        _ = LMEvalTask("qvlm_pair", include_path=str(tmp_path)).lm_task


def test_lm_eval_cli_wrapper_agrees_with_the_harness_run(mc_run, tiny_model_dir, tmp_path):
    """`python -m qvlm_harness.lmeval_cli run --model qvlm-harness ...` (lm-eval's own CLI) gives the harness's
    scores."""
    from qvlm_harness.lmeval_cli import main

    result, _ = mc_run
    args = ["run", "--model", "qvlm-harness", "--model_args", f"model={tiny_model_dir},method=rtn,bits=w4a4",
            "--batch_size", "4", "--tasks", "qvlm_sqa_mc", "--include_path", str(DATA), "--apply_chat_template",
            "--output_path", str(tmp_path), "--log_samples"]
    assert main(args) == 0
    (results_file,) = tmp_path.glob("**/results_*.json")
    lm_results = json.loads(results_file.read_text())
    bridged = next(r for r in result.rows if r.task == "lmeval:qvlm_sqa_mc")
    assert lm_results["results"]["qvlm_sqa_mc"]["acc,none"] == pytest.approx(bridged.metrics["acc,none"])
    assert lm_results["config"]["qvlm_bits"] == "w4a4" and lm_results["config"]["qvlm_execution"] == "simulated"
    (samples_file,) = tmp_path.glob("**/samples_qvlm_sqa_mc_*.jsonl")
    per_doc = {json.loads(line)["doc_id"]: json.loads(line)["acc"] for line in samples_file.read_text().splitlines()}
    assert per_doc == {i: float(e) for i, e in enumerate(_harness_correct(mc_run))}


def _harness_correct(mc_run) -> list[bool]:
    _, out = mc_run
    return [e["record"]["metrics"]["acc,none"] == 1.0
            for e in sorted(sample_log(out, "lmeval:qvlm_sqa_mc"), key=lambda e: int(e["id"]))]


def test_harness_cli_mixes_native_and_lmeval_tasks_in_one_table(mc_run, tiny_model_dir, tmp_path, capsys):
    """`harness run --tasks sqa,lmeval:qvlm_sqa_mc --lmeval-include DIR`: one main table with both columns, rows in
    the store equal to the runner's, and the flags refused without an lmeval: task."""
    from qvlm_harness.cli import main
    from qvlm_harness.store import Store

    args = ["run", "--model", str(tiny_model_dir), "--methods", "rtn", "--bits", "w4a4", "--tasks",
            "sqa,lmeval:qvlm_sqa_mc", "--scoring", "loglik", "--lmeval-include", str(DATA), "--data-dir", str(DATA),
            "--batch-size", "4", "--max-new-tokens", "16", "--output", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| Method"))
    assert "ScienceQA" in header and "lmeval:qvlm_sqa_mc" in header
    stored = {r.task: r.metrics for r in Store(tmp_path / "harness.db").rows()}
    expected = {r.task: r.metrics for r in mc_run[0].rows}
    assert stored["lmeval:qvlm_sqa_mc"]["acc,none"] == pytest.approx(expected["lmeval:qvlm_sqa_mc"]["acc,none"])
    assert stored["sqa"]["acc"] == pytest.approx(expected["sqa"]["acc"])
    assert main(["run", "--model", str(tiny_model_dir), "--methods", "rtn", "--bits", "w4a4", "--tasks", "sqa",
                 "--lmeval-include", str(DATA), "--output", str(tmp_path)]) == 2
    assert "add one to --tasks" in capsys.readouterr().err


def test_hook_commands_write_and_remove_the_pth_file(tmp_path, monkeypatch, capsys):
    from qvlm_harness.lmeval import hook
    from qvlm_harness.lmeval_cli import main

    monkeypatch.setattr(hook, "site_dir", lambda: str(tmp_path))
    pth = tmp_path / hook.PTH_NAME
    assert main(["hook-status"]) == 0 and "not installed" in capsys.readouterr().out
    assert main(["install-hook"]) == 0 and pth.read_text() == hook.PTH_LINE
    assert main(["hook-status"]) == 0 and "hook installed" in capsys.readouterr().out
    assert main(["uninstall-hook"]) == 0 and not pth.exists()


# -- the real command lines in fresh interpreters (slow: each imports torch, transformers and lm-eval) ---------------
def _env_with_hook(tmp_path: Path) -> dict[str, str]:
    """The environment of a user who ran `python -m qvlm_harness.lmeval_cli install-hook`: the hook's .pth file sits
    in a site folder Python processes at start-up. A sitecustomize stands in for site-packages (the test must not write
    into the shared environment); `site.addsitedir` is what Python's own start-up runs on site-packages."""
    from qvlm_harness.lmeval.hook import install_hook

    site_dir, custom = tmp_path / "site", tmp_path / "custom"
    site_dir.mkdir()
    custom.mkdir()
    install_hook(site_dir)
    (custom / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({str(site_dir)!r})\n")
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(custom)])}


@pytest.mark.slow
def test_python_m_harness_run_in_a_fresh_process(tiny_model_dir, tmp_path):
    """`python -m qvlm_harness run --tasks sqa,lmeval:qvlm_sqa_mc --lmeval-include DIR` as a user types it: lm-eval's
    per-document scores equal the native task's on every item, and the main table shows both."""
    cmd = [sys.executable, "-m", "harness", "run", "--model", str(tiny_model_dir), "--methods", "fp32,rtn", "--bits",
           "w4a4", "--tasks", "sqa,lmeval:qvlm_sqa_mc", "--scoring", "loglik", "--lmeval-include", str(DATA),
           "--data-dir", str(DATA), "--batch-size", "4", "--output", str(tmp_path / "out"), "--no-progress"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert "lmeval:qvlm_sqa_mc" in rows[0] and "ScienceQA" in rows[0]
    assert any(r.startswith("| fp32") for r in rows) and any(r.startswith("| rtn") for r in rows)
    logs = {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in (tmp_path / "out").glob("*/samples/*.jsonl")}
    for method in ("fp32", "rtn"):
        native = next(v for k, v in logs.items() if k.startswith(f"{method}-") and "-sqa-" in k)
        bridged = next(v for k, v in logs.items() if k.startswith(f"{method}-") and "lmeval" in k)
        native_correct = {e["id"]: float(e["record"]["correct"]) for e in native}
        assert {PIDS[int(e["id"])]: e["record"]["metrics"]["acc,none"] for e in bridged} == native_correct


@pytest.fixture(scope="module")
def gen_run(tiny_model_dir, tmp_path_factory):
    """Native sqa (greedy generation, batch 1) beside the mirrored lm-eval generation task, all 12 items."""
    out = tmp_path_factory.mktemp("gen")
    s = spec(tiny_model_dir, out, ["sqa", "lmeval:qvlm_sqa_gen"], batch_size=1)
    return Runner(s, log=lambda m: None, progress=False).run(), out


@pytest.mark.slow
@pytest.mark.parametrize(("script", "task"), [("lm-eval run", "qvlm_sqa_mc"), ("lm_eval", "qvlm_sqa_gen")])
def test_plain_lm_eval_command_finds_the_model_through_the_hook(script, task, request, tiny_model_dir, tmp_path):
    """The real `lm-eval run` / `lm_eval` (legacy spelling) console scripts with the hook installed: lm-eval's
    per-document scores equal the harness's native `sqa` scoring of the same items (log-likelihood of option letters
    for the multiple-choice task, greedy generation + the harness's parser for the generative one)."""
    name, *subcommand = script.split()
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        pytest.skip(f"no {name} console script beside {sys.executable}")
    result, out_dir = request.getfixturevalue("mc_run" if task == "qvlm_sqa_mc" else "gen_run")
    out = subprocess.run([str(exe), *subcommand, "--model", "qvlm-harness", "--model_args",
                          f"model={tiny_model_dir},method=rtn,bits=w4a4", "--batch_size", "4" if "mc" in task else "1",
                          "--tasks", task, "--include_path", str(DATA), "--apply_chat_template", "--log_samples",
                          "--output_path", str(tmp_path / "out")],
                         cwd=tmp_path, env=_env_with_hook(tmp_path), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    (results_file,) = (tmp_path / "out").glob("**/results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["qvlm_method"] == "rtn" and results["config"]["qvlm_execution"] == "simulated"
    (samples_file,) = (tmp_path / "out").glob(f"**/samples_{task}_*.jsonl")
    per_doc = {PIDS[d["doc_id"]]: d["acc"] for d in map(json.loads, samples_file.read_text().splitlines())}
    native = {e["id"]: float(e["record"]["correct"]) for e in sample_log(out_dir, "sqa")}
    assert per_doc == native
    native_row = next(r for r in result.rows if r.task == "sqa")
    assert results["results"][task]["acc,none"] == pytest.approx(native_row.metrics["acc"] / 100)
