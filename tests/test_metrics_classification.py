"""ROC AUC, accuracy and bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from qvlm_harness.metrics.classification import (
    UndefinedMetricWarning,
    binary_accuracy,
    bootstrap_ci,
    paired_bootstrap_ci,
    roc_auc,
)


@pytest.mark.parametrize("seed", range(10))
def test_roc_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.integers(0, 2, size=n)
    labels[0], labels[1] = 0, 1  # both classes present
    scores = rng.integers(0, 6, size=n).astype(float)  # few distinct values -> many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    cont = rng.normal(size=n) + labels  # continuous scores as well
    assert roc_auc(labels, cont) == pytest.approx(roc_auc_score(labels, cont), abs=1e-12)


def test_roc_auc_hand_cases() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied
    # pairs (pos, neg): (0.4 vs 0.1) win, (0.4 vs 0.4) tie = 1/2 -> (1 + 0.5) / 2
    assert roc_auc([True, False, False], [0.4, 0.1, 0.4]) == 0.75


def test_roc_auc_single_class_is_nan() -> None:
    with pytest.warns(UndefinedMetricWarning, match="only one class"):
        assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(roc_auc([], []))


def test_roc_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="binary"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="equal length"):
        roc_auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.1, float("nan")])


def test_binary_accuracy() -> None:
    assert binary_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert binary_accuracy([True, False], [1, 0]) == 1.0
    with pytest.raises(ValueError):
        binary_accuracy([1, 0], [1])
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(binary_accuracy([], []))


def test_paired_bootstrap_deterministic_per_seed() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random(200), rng.random(200)
    assert paired_bootstrap_ci(a, b, seed=3) == paired_bootstrap_ci(a, b, seed=3)
    assert paired_bootstrap_ci(a, b, seed=3) != paired_bootstrap_ci(a, b, seed=4)
    assert bootstrap_ci(a, seed=5) == bootstrap_ci(a, seed=5)


def test_paired_bootstrap_contains_observed_delta() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 2, size=500).astype(float)
    b = np.where(rng.random(500) < 0.1, 1 - a, a)  # b flips 10% of a's outcomes
    delta, low, high = paired_bootstrap_ci(a, b, n_resamples=2000, seed=0)
    assert delta == pytest.approx(b.mean() - a.mean())
    assert low <= delta <= high
    assert low < high


def test_paired_bootstrap_planted_difference_excludes_zero() -> None:
    rng = np.random.default_rng(3)
    a = (rng.random(400) < 0.5).astype(float)
    b = np.maximum(a, rng.random(400) < 0.5)  # b is right wherever a is, and on ~half the rest
    delta, low, high = paired_bootstrap_ci(a, b, seed=0)
    assert delta > 0.15
    assert 0.0 < low <= delta <= high


def test_paired_bootstrap_identical_inputs_is_zero() -> None:
    x = np.random.default_rng(4).random(100)
    assert tuple(paired_bootstrap_ci(x, x.copy())) == (0.0, 0.0, 0.0)


def test_pairing_tightens_the_interval() -> None:
    # Shared per-question difficulty cancels in the paired difference: the paired interval of a constant
    # shift is degenerate, while an unpaired view of the same data would be wide.
    x = np.random.default_rng(5).random(300)
    delta, low, high = paired_bootstrap_ci(x, x + 0.1)
    assert delta == pytest.approx(0.1) and high - low < 1e-9
    single = bootstrap_ci(x)
    assert single.high - single.low > 0.01


def test_bootstrap_ci_single_system_and_custom_statistic() -> None:
    x = np.arange(100, dtype=float)
    est, low, high = bootstrap_ci(x, n_resamples=500, seed=0, ci=0.9)
    assert est == pytest.approx(49.5) and low < est < high
    med = bootstrap_ci(x, n_resamples=200, seed=0, statistic=np.median)
    assert med.estimate == pytest.approx(49.5) and med.low <= med.estimate <= med.high
    # rows are samples: a 2-D array with (label, score) columns and AUC as the statistic
    rng = np.random.default_rng(6)
    labels = np.r_[np.zeros(50), np.ones(50)]
    table = np.c_[labels, labels + rng.normal(scale=0.8, size=100)]
    auc = bootstrap_ci(table, n_resamples=200, seed=0, statistic=lambda t: roc_auc(t[:, 0], t[:, 1]))
    assert auc.estimate == pytest.approx(roc_auc(table[:, 0], table[:, 1]))
    assert 0.5 < auc.low <= auc.estimate <= auc.high <= 1.0


def test_bootstrap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        bootstrap_ci([], n_resamples=10)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], ci=1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], n_resamples=0)
