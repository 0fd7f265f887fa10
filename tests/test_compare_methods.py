"""`harness compare --methods A,B`: paired differences between two methods of a store, through the CLI, on a
store built from synthetic rows and per-sample logs; refused when the two cells were not computed on the same
samples."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from qvlm_harness.cli import main
from qvlm_harness.store import ResultRow, SampleLog, Store
from qvlm_harness.task import aggregate_trials
from qvlm_harness.tasks.sqa import ScienceQA
from qvlm_harness.tasks.vqav2 import VQAv2

N = 150
MODEL = "tiny-test"


def acc_records(p: float, seed: int, n: int = N) -> list[dict]:
    x = (np.random.default_rng(seed).random(n) < p).astype(float)
    types = ("yes/no", "number", "other")
    return [{"accuracy": float(v), "answer_type": types[i % 3]} for i, v in enumerate(x)]


def flip(records: list[dict], down: int, up: int, seed: int = 1) -> list[dict]:
    """`down` right answers become wrong and `up` wrong ones right."""
    out = [dict(r) for r in records]
    acc = np.array([r["accuracy"] for r in records])
    rng = np.random.default_rng(seed)
    for i in rng.choice(np.flatnonzero(acc == 1), down, replace=False):
        out[i]["accuracy"] = 0.0
    for i in rng.choice(np.flatnonzero(acc == 0), up, replace=False):
        out[i]["accuracy"] = 1.0
    return out


class StoreBuilder:
    """Rows as the runner writes them: metrics from aggregate_trials, a sample log where cell_from_row looks."""

    def __init__(self, root):
        self.out = root / "out"
        self.store = Store(self.out / "harness.db")
        self.n = 0

    def add(self, method, bits, task, records, *, shots=0, trials=1, run="run1", ids=None, **row):
        self.n += 1
        cell_id = f"cell{self.n}"
        ids = ids or [f"q{i:04d}" for i in range(len(records[0] if trials > 1 else records))]
        per_trial = records if trials > 1 else [records]
        entries = [{"key": f"{t}:{i}", "trial": t, "id": i, "record": r}
                   for t, recs in enumerate(per_trial) for i, r in zip(ids, recs, strict=True)]
        log = SampleLog(self.out / MODEL / "samples" / f"{cell_id}.jsonl")
        log.append(entries)
        task_obj = {"vqav2": VQAv2, "sqa": ScienceQA}[task]()
        fields = dict(split="val", seed=0, n_samples=len(ids), execution="simulated", sample_limit=None,
                      data_fingerprint="data0", scoring="generate", model_fingerprint="weights0")
        fields |= row
        self.store.put(ResultRow(cell_id=cell_id, run_id=run, model=MODEL, method=method, bits=bits, task=task,
                                 metrics=aggregate_trials(task_obj, entries, trials), shots=shots,
                                 settings={"trials": trials, "samples_log": str(log.path)}, **fields))
        time.sleep(0.01)  # rows are ordered by creation time
        return entries


def run_cli(*args) -> int:
    return main(["compare", *args])


def as_json(capsys, out, *args) -> dict:
    assert run_cli("--output", str(out), "--methods", *args, "--json", "-") == 0
    return json.loads(capsys.readouterr().out)


def test_significantly_better_worse_and_indistinguishable(tmp_path, capsys):
    b = StoreBuilder(tmp_path)
    base = acc_records(0.6, seed=0)
    good = flip(base, down=0, up=25)  # +16.7 points, every change one way
    noisy = flip(base, down=4, up=5)  # +0.7 points of churn
    b.add("awq", "w4a4", "vqav2", good)
    b.add("rtn", "w4a4", "vqav2", base)
    b.add("awq", "w8a8", "vqav2", noisy)
    b.add("rtn", "w8a8", "vqav2", base)
    assert run_cli("--output", str(b.out), "--methods", "awq,rtn") == 0
    text = capsys.readouterr().out
    assert "awq better" in text and "not distinguishable" in text
    assert "significantly better in 1, worse in 0, not distinguishable in 1 of 2" in text

    data = as_json(capsys, b.out, "awq,rtn")
    by_bits = {c["bits_a"]: c for c in data["comparisons"]}
    w4 = by_bits["w4a4"]
    assert w4["verdict"] == "better" and w4["metric"] == "acc" and w4["n_paired"] == N
    # independent reference: paired bootstrap of the mean difference, ids resampled in sorted order
    a = np.array([r["accuracy"] for r in good])
    c = np.array([r["accuracy"] for r in base])
    idx = np.random.default_rng(0).integers(0, N, size=(1000, N))
    low, high = np.quantile(100 * (a[idx].mean(axis=1) - c[idx].mean(axis=1)), [0.025, 0.975])
    assert w4["delta"] == pytest.approx(100 * (a.mean() - c.mean()))
    assert (w4["low"], w4["high"]) == pytest.approx((low, high))
    assert w4["a"] == pytest.approx(100 * a.mean()) and w4["b"] == pytest.approx(100 * c.mean())
    assert by_bits["w8a8"]["verdict"] == "not distinguishable"
    assert by_bits["w8a8"]["low"] < 0 < by_bits["w8a8"]["high"]
    # the other way round, A is worse
    flipped = {c["bits_a"]: c for c in as_json(capsys, b.out, "rtn,awq")["comparisons"]}
    assert flipped["w4a4"]["verdict"] == "worse"
    assert flipped["w4a4"]["delta"] == pytest.approx(-w4["delta"])


def test_a_float_method_pairs_with_every_bits(tmp_path, capsys):
    b = StoreBuilder(tmp_path)
    fp = acc_records(0.8, seed=2)
    b.add("fp32", "fp", "vqav2", fp)
    b.add("rtn", "w8a8", "vqav2", flip(fp, down=2, up=1))
    b.add("rtn", "w4a4", "vqav2", flip(fp, down=60, up=0))
    data = as_json(capsys, b.out, "rtn,fp32")
    pairs = {(c["bits_a"], c["bits_b"]): c["verdict"] for c in data["comparisons"]}
    assert pairs == {("w8a8", "fp"): "not distinguishable", ("w4a4", "fp"): "worse"}
    assert run_cli("--output", str(b.out), "--methods", "fp32,rtn") == 0
    assert "fp / w4a4" in capsys.readouterr().out


def test_lower_is_better_metric_and_metric_selection(tmp_path, capsys):
    b = StoreBuilder(tmp_path)
    rng = np.random.default_rng(3)

    def sqa(fail_rate):
        parsed = rng.random(N) >= fail_rate
        return [{"correct": bool(p and rng.random() < 0.7), "parsed": bool(p), "subject": "natural science",
                 "hint": "", "image": None, "grade": "grade3"} for p in parsed]

    b.add("rtn", "w4a4", "sqa", sqa(0.4))
    b.add("awq", "w4a4", "sqa", sqa(0.02))
    data = as_json(capsys, b.out, "rtn,awq", "--metrics", "parse_fail,acc")
    verdicts = {c["metric"]: c["verdict"] for c in data["comparisons"]}
    # rtn fails to parse far more often: a positive difference of a lower-is-better metric is "worse"
    assert verdicts == {"parse_fail": "worse", "acc": "worse"}
    assert [c["metric"] for c in as_json(capsys, b.out, "rtn,awq")["comparisons"]] == ["acc"]  # primary
    metrics = {c["metric"] for c in as_json(capsys, b.out, "rtn,awq", "--metrics", "all")["comparisons"]}
    assert {"acc", "NAT", "NO", "G1-6", "parse_fail"} <= metrics and not any(m.startswith("n_") for m in metrics)


def test_newest_rows_or_one_run(tmp_path, capsys):
    b = StoreBuilder(tmp_path)
    base = acc_records(0.5, seed=4)
    b.add("rtn", "w4a4", "vqav2", base, run="old")
    b.add("awq", "w4a4", "vqav2", flip(base, down=30, up=0), run="old")
    b.add("awq", "w4a4", "vqav2", flip(base, down=0, up=30), run="new")
    b.add("rtn", "w4a4", "vqav2", base, run="new")
    assert as_json(capsys, b.out, "awq,rtn")["comparisons"][0]["verdict"] == "better"  # newest wins
    assert as_json(capsys, b.out, "awq,rtn", "--run", "old")["comparisons"][0]["verdict"] == "worse"


def refused(capsys, out, *args) -> str:
    assert run_cli("--output", str(out), "--methods", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cells_on_different_samples_are_refused(tmp_path, capsys):
    base = acc_records(0.5, seed=5)
    cases = {
        "limit": (dict(sample_limit=100), dict(sample_limit=150), "different sample limits"),
        "fingerprint": (dict(data_fingerprint="aaa"), dict(data_fingerprint="bbb"), "different samples"),
        "split": (dict(split="val"), dict(split="train"), "different splits"),
    }
    for name, (row_a, row_b, message) in cases.items():
        b = StoreBuilder(tmp_path / name)
        b.add("awq", "w4a4", "vqav2", base, **row_a)
        b.add("rtn", "w4a4", "vqav2", base, **row_b)
        assert message in refused(capsys, b.out, "awq,rtn"), name
    # no fingerprint recorded: the sample ids themselves decide
    b = StoreBuilder(tmp_path / "ids")
    b.add("awq", "w4a4", "vqav2", base, data_fingerprint=None)
    b.add("rtn", "w4a4", "vqav2", base, data_fingerprint=None, ids=[f"x{i:04d}" for i in range(N)])
    err = refused(capsys, b.out, "awq,rtn")
    assert "different samples (150 vs 150, e.g. 'q0000' only in A)" in err
    # few-shot cells: other trials, or demonstrations drawn with another seed
    b = StoreBuilder(tmp_path / "trials")
    b.add("awq", "w4a4", "vqav2", [base, base], shots=4, trials=2)
    b.add("rtn", "w4a4", "vqav2", base, shots=4, trials=1)
    assert "2 vs 1 few-shot trials" in refused(capsys, b.out, "awq,rtn")
    b = StoreBuilder(tmp_path / "seed")
    b.add("awq", "w4a4", "vqav2", base, shots=4, seed=0)
    b.add("rtn", "w4a4", "vqav2", base, shots=4, seed=1)
    assert "different seeds" in refused(capsys, b.out, "awq,rtn")


def test_bad_method_arguments_are_refused(tmp_path, capsys):
    b = StoreBuilder(tmp_path)
    base = acc_records(0.5, seed=6)
    b.add("awq", "w4a4", "vqav2", base)
    b.add("rtn", "w8a8", "vqav2", base)
    assert "has no results" in refused(capsys, b.out, "awq,gptq")
    assert "two methods" in refused(capsys, b.out, "awq")
    assert "share no task x bits" in refused(capsys, b.out, "awq,rtn")
    b.add("rtn", "w4a4", "vqav2", base)
    assert "none of the metrics" in refused(capsys, b.out, "awq,rtn", "--metrics", "auroc")


def test_few_shot_trials_are_paired(tmp_path, capsys):
    b = StoreBuilder(tmp_path)
    t0, t1 = acc_records(0.5, seed=7), acc_records(0.5, seed=8)
    b.add("awq", "w4a4", "vqav2", [flip(t0, 0, 20), flip(t1, 0, 20)], shots=4, trials=2)
    b.add("rtn", "w4a4", "vqav2", [t0, t1], shots=4, trials=2)
    (c,) = as_json(capsys, b.out, "awq,rtn")["comparisons"]
    assert c["trials"] == 2 and c["shots"] == 4 and c["verdict"] == "better"
    assert c["delta"] == pytest.approx(100 * 20 / N)
