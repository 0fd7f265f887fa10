"""Bootstrap intervals per cell and paired intervals between cells: equal to independent bootstraps written here
(numpy; scikit-learn for ROC AUC), cover the truth at the nominal rate, and behave on degenerate cells."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from qvlm_harness.metrics.intervals import (
    IntervalWarning,
    cell_intervals,
    interval_columns,
    interval_metrics,
    paired_intervals,
)
from qvlm_harness.regression import CellScores, compare
from qvlm_harness.tasks.hateful_memes import HatefulMemes
from qvlm_harness.tasks.sqa import ScienceQA
from qvlm_harness.tasks.vqav2 import VQAv2


class AccuracyTask(VQAv2):
    """The smallest task: accuracy of 0/1 records (inherits the VQA aggregate, one answer type)."""


def entries(records, trials=1):
    """Per-sample log entries (records, or one list of records per trial); zero-padded ids, so that the sorted ids
    (the order samples are resampled in) are the records' order."""
    per_trial = records if trials > 1 else [records]
    return [{"trial": t, "id": f"s{i:04d}", "record": r}
            for t, recs in enumerate(per_trial) for i, r in enumerate(recs)]


def ref_draws(n, n_boot, seed):
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def ref_interval(values, level=0.95):
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    return tuple(np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2]))


def vqa_records(n, seed=0):
    rng = np.random.default_rng(seed)
    acc = rng.choice([0.0, 0.3, 0.6, 1.0], size=n, p=[0.3, 0.1, 0.1, 0.5])
    types = rng.choice(["yes/no", "number", "other"], size=n, p=[0.4, 0.2, 0.4])
    return [{"accuracy": float(a), "answer_type": str(t)} for a, t in zip(acc, types, strict=True)], acc, types


def hm_records(n, seed=0, signal=0.3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    p = np.clip(0.5 + signal * (labels - 0.5) + rng.normal(0, 0.2, n), 0.01, 0.99)
    return ([{"p_yes": float(x), "pred": int(x > 0.5), "label": int(y), "correct": int(x > 0.5) == int(y)}
             for x, y in zip(p, labels, strict=True)], labels, p)


# -- equal to an independent bootstrap -------------------------------------------------------------------------------
def test_accuracy_and_answer_types_equal_an_independent_numpy_bootstrap():
    recs, acc, types = vqa_records(300)
    got = cell_intervals(VQAv2(), entries(recs), 1, n_boot=800, seed=5)
    idx = ref_draws(300, 800, 5)
    assert got["acc"] == pytest.approx(ref_interval(100 * acc[idx].mean(axis=1)))
    member = (types == "number").astype(float)
    per_resample = 100 * (acc * member)[idx].sum(axis=1) / member[idx].sum(axis=1)
    assert got["number"] == pytest.approx(ref_interval(per_resample))
    assert set(got) == {"acc", "yes/no", "number", "other"}  # no interval for the n_* counts


def test_auroc_equals_an_independent_sklearn_bootstrap():
    recs, labels, p = hm_records(200)
    got = cell_intervals(HatefulMemes(), entries(recs), 1, n_boot=300, seed=2)
    idx = ref_draws(200, 300, 2)
    aucs = [100 * roc_auc_score(labels[row], p[row]) for row in idx]
    accs = [100 * np.mean((p[row] > 0.5) == labels[row]) for row in idx]
    assert got["auroc"] == pytest.approx(ref_interval(aucs))
    assert got["acc"] == pytest.approx(ref_interval(accs))


def test_few_shot_trials_resample_questions_and_average_the_trial_aggregates():
    """Two trials of the same questions: a resample draws question ids and keeps both trials of each."""
    rec0, labels, p0 = hm_records(150, seed=1)
    rec1, labels1, p1 = hm_records(150, seed=1, signal=0.1)  # same memes (labels), other scores: other demos
    assert (labels == labels1).all()
    got = cell_intervals(HatefulMemes(), entries([rec0, rec1], trials=2), 2, n_boot=200, seed=9)
    idx = ref_draws(150, 200, 9)
    mean_auc = [50 * (roc_auc_score(labels[row], p0[row]) + roc_auc_score(labels1[row], p1[row])) for row in idx]
    mean_acc = [50 * (np.mean((p0[row] > 0.5) == labels[row]) + np.mean((p1[row] > 0.5) == labels1[row]))
                for row in idx]
    assert got["auroc"] == pytest.approx(ref_interval(mean_auc))
    assert got["acc"] == pytest.approx(ref_interval(mean_acc))
    assert "auroc_std" not in got and "trials" not in got


def test_vectorised_group_means_equal_the_aggregate_on_every_resample():
    """ScienceQA's categories overlap (TXT/IMG) and are sometimes empty in a resample; the fast path must still
    equal recomputing aggregate_sqa on each resample."""
    rng = random.Random(0)
    subjects = ["natural science", "social science", "language science"]
    recs = [{"correct": (ok := rng.random() < 0.6), "parsed": ok or rng.random() < 0.7,
             "subject": rng.choice(subjects), "hint": rng.choice(["", "a hint"]), "image": rng.choice([None, "i.png"]),
             "grade": f"grade{rng.randint(1, 12)}"} for _ in range(120)]
    recs[7]["grade"] = "grade99"  # in no grade group
    fast = cell_intervals(ScienceQA(), entries(recs), 1, n_boot=400, seed=3)
    slow = cell_intervals(ScienceQA(), entries(recs), 1, n_boot=400, seed=3, vectorise=False)
    assert set(fast) == {"acc", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "parse_fail"}
    for metric in fast:
        assert fast[metric] == pytest.approx(slow[metric]), metric


def test_order_of_entries_does_not_matter():
    recs, _, _ = vqa_records(80)
    e = entries(recs)
    shuffled = e[::-1]
    assert cell_intervals(VQAv2(), e, 1, n_boot=100) == cell_intervals(VQAv2(), shuffled, 1, n_boot=100)


# -- coverage and degenerate cells ------------------------------------------------------------------------------------
def test_coverage_on_bernoulli_data():
    """The 95% interval covers the true p in about 95% of seeded repetitions."""
    p, n, reps = 0.3, 120, 300
    covered = 0
    for rep in range(reps):
        x = (np.random.default_rng(1000 + rep).random(n) < p).astype(float)
        lo, hi = cell_intervals(AccuracyTask(), entries([{"accuracy": v} for v in x]), 1, n_boot=500, seed=rep)["acc"]
        covered += lo <= 100 * p <= hi
    assert 0.91 <= covered / reps <= 0.985


def test_degenerate_cells():
    all_right = entries([{"accuracy": 1.0, "answer_type": "yes/no"}] * 30)
    got = cell_intervals(VQAv2(), all_right, 1)
    assert got["acc"] == (100.0, 100.0) and got["yes/no"] == (100.0, 100.0)
    assert all(math.isnan(x) for x in got["number"])  # no number question: undefined, not 0
    one = entries([{"accuracy": 0.6, "answer_type": "other"}])
    assert cell_intervals(VQAv2(), one, 1)["acc"] == pytest.approx((60.0, 60.0))
    one_meme = entries(hm_records(1)[0])
    got = cell_intervals(HatefulMemes(), one_meme, 1)
    assert all(math.isnan(x) for x in got["auroc"]) and got["acc"][0] == got["acc"][1]
    with pytest.raises(ValueError, match="at least one sample"):
        cell_intervals(VQAv2(), [], 1)
    with pytest.raises(ValueError, match="level"):
        cell_intervals(VQAv2(), one, 1, level=95)


def test_resamples_lacking_a_class_are_left_out():
    """12 memes, 2 hateful: some resamples draw no hateful meme and have no AUROC; the interval is over the rest."""
    recs, labels, p = hm_records(12, seed=4)
    labels[:] = 0
    labels[[3, 8]] = 1
    for r, y in zip(recs, labels, strict=True):
        r["label"] = int(y)
    idx = ref_draws(12, 200, 0)
    aucs = [100 * roc_auc_score(labels[row], p[row]) if 0 < labels[row].sum() < 12 else np.nan for row in idx]
    assert np.isnan(aucs).any()
    assert cell_intervals(HatefulMemes(), entries(recs), 1, n_boot=200)["auroc"] == pytest.approx(ref_interval(aucs))
    # with two trials (the same memes, other scores) such a resample is undefined in both: still left out
    recs2 = [dict(r, p_yes=1.0 - r["p_yes"], pred=1 - r["pred"]) for r in recs]
    aucs2 = [50 * (roc_auc_score(labels[row], p[row]) + roc_auc_score(labels[row], 1 - p[row]))
             if 0 < labels[row].sum() < 12 else np.nan for row in idx]
    got = cell_intervals(HatefulMemes(), entries([recs, recs2], trials=2), 2, n_boot=200)["auroc"]
    assert got == pytest.approx(ref_interval(aucs2))


def test_an_aggregate_too_slow_to_resample_gets_no_interval_with_a_warning():
    recs, _, _ = hm_records(50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cell_intervals(HatefulMemes(), entries(recs), 1, budget_s=0.0)
    assert any(issubclass(w.category, IntervalWarning) and "auroc" in str(w.message) for w in caught)
    assert all(math.isnan(x) for bounds in got.values() for x in bounds)
    # group means never call the aggregate per resample: no budget to exceed
    vqa, _, _ = vqa_records(50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cell_intervals(VQAv2(), entries(vqa), 1, budget_s=0.0)["acc"][0] > 0


def test_which_metrics_get_intervals_and_their_columns():
    metrics = {"acc": 50.0, "n_acc": 10, "n": 10.0, "auroc_std": 1.0, "trials": 3.0, "acc_stderr,none": 0.1,
               "acc,none": 0.5, "acc_ci_lo": 40.0, "flag": True, "label": "x", "other": math.nan}
    assert interval_metrics(metrics) == ["acc", "acc,none", "other"]
    assert interval_columns({"acc": (40.0, 60.0)}) == {"acc_ci_lo": 40.0, "acc_ci_hi": 60.0}


# -- paired ------------------------------------------------------------------------------------------------------------
def test_paired_interval_equals_an_independent_numpy_bootstrap():
    _, a, _ = vqa_records(250, seed=1)
    b = a.copy()
    flip = np.random.default_rng(2).choice(250, 30, replace=False)
    b[flip] = 1.0 - np.round(b[flip])
    ea = entries([{"accuracy": float(x)} for x in a])
    eb = entries([{"accuracy": float(x)} for x in b])
    got = paired_intervals(AccuracyTask(), ea, eb, 1, n_boot=600, seed=4)["acc"]
    idx = ref_draws(250, 600, 4)
    assert got.estimate == pytest.approx(100 * (a.mean() - b.mean()))
    assert (got.low, got.high) == pytest.approx(ref_interval(100 * (a[idx].mean(axis=1) - b[idx].mean(axis=1))))


def test_paired_interval_agrees_with_regression_compare():
    """An independent implementation: regression's paired bootstrap (classification.paired_bootstrap_ci over the
    task's aggregate), here comparing A against B as the 'baseline'."""
    recs_a, labels, pa = hm_records(160, seed=6)
    recs_b, _, pb = hm_records(160, seed=6, signal=0.05)
    for r, y in zip(recs_b, labels, strict=True):
        r["label"] = int(y)
        r["correct"] = r["pred"] == int(y)
    ea, eb = entries(recs_a), entries(recs_b)
    got = paired_intervals(HatefulMemes(), ea, eb, 1, n_boot=300, seed=1)
    cell = lambda e: CellScores("m", "w4a4", "hm", 0, {"auroc": 0.0, "acc": 0.0}, list(e))
    comp = compare([cell(ea)], [cell(eb)], n_resamples=300, seed=1)
    for check in comp.checks:
        ci = got[check.metric]
        assert (ci.low, ci.high) == pytest.approx((check.delta.low, check.delta.high)), check.metric
        assert ci.estimate == pytest.approx(check.delta.estimate)
    assert got["auroc"].estimate == pytest.approx(100 * (roc_auc_score(labels, pa) - roc_auc_score(labels, pb)))


def test_paired_intervals_need_the_same_samples():
    recs, _, _ = vqa_records(10)
    with pytest.raises(ValueError, match="same samples"):
        paired_intervals(VQAv2(), entries(recs), entries(recs[:9]), 1)
    same = paired_intervals(VQAv2(), entries(recs), entries(recs), 1)
    assert tuple(same["acc"]) == (0.0, 0.0, 0.0)
