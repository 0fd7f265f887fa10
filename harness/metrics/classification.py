"""Binary rank-classification metrics (Hateful Memes) and bootstrap confidence intervals.

ROC AUC is implemented here (Mann-Whitney U with average ranks for ties) rather than imported, so the harness
core needs only numpy and the tie rule is explicit: rank-classification scores are log-probabilities of
"yes", and low-bit models produce many exactly tied scores, where the tie rule changes the number. With
average ranks a tie between a positive and a negative counts 1/2, which is what sklearn's roc_auc_score
computes too (the tests check equality).

The bootstrap helpers give intervals for a single system and for the paired difference between two systems
scored on the same samples (quantized vs. baseline), used by regression tracking to tell a real drop from
sample noise. Both are deterministic for a given seed.

Conventions: `roc_auc` and `binary_accuracy` return fractions in [0, 1]; undefined values are NaN with an
`UndefinedMetricWarning` that says why, never a silent 0 or 0.5.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ConfidenceInterval",
    "UndefinedMetricWarning",
    "binary_accuracy",
    "bootstrap_ci",
    "paired_bootstrap_ci",
    "roc_auc",
]

Statistic = Callable[[np.ndarray], Any]

_MAX_INDEX_CELLS = 4_000_000  # resample indices generated per chunk (bounds memory at ~32 MB)


class UndefinedMetricWarning(RuntimeWarning):
    """A metric is undefined for the given data (e.g. ROC AUC with a single class); NaN was returned."""


class ConfidenceInterval(NamedTuple):
    """A point estimate on the full data and the percentile-bootstrap interval around it."""

    estimate: float
    low: float
    high: float


def _binary_labels(labels: Sequence[Any] | np.ndarray, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5].tolist()
        raise ValueError(f"{name} must be binary (0/1 or bool); found {bad}")
    return arr.astype(bool)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x; tied values all get the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_group = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(starts_group) - 1
    first = np.flatnonzero(starts_group)  # 0-based first position of each tie group
    last = np.r_[first[1:], x.size] - 1  # 0-based last position
    mean_rank = (first + last) / 2.0 + 1.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def roc_auc(labels: Sequence[Any] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative) + P(tie) / 2.

    Computed as the Mann-Whitney U statistic of the positives over n_pos * n_neg, with average ranks for
    ties. `labels` are 0/1 or bool (1 = positive, e.g. hateful); higher `scores` mean "more positive".
    With only one class present the AUC is undefined: returns NaN and emits `UndefinedMetricWarning`.
    """
    y = _binary_labels(labels)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN/inf): a NaN score cannot be ranked")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        only = "no samples" if y.size == 0 else f"all {y.size} labels are {int(n_pos > 0)}"
        warnings.warn(
            f"ROC AUC is undefined with only one class present ({only}); returning NaN",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        return math.nan
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def binary_accuracy(labels: Sequence[Any] | np.ndarray, predictions: Sequence[Any] | np.ndarray) -> float:
    """Fraction of predictions (0/1 or bool) equal to the labels; NaN with a warning when empty."""
    y = _binary_labels(labels, "labels")
    p = _binary_labels(predictions, "predictions")
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {y.size} vs {p.size}")
    if y.size == 0:
        warnings.warn(
            "accuracy of zero samples is undefined; returning NaN", UndefinedMetricWarning, stacklevel=2
        )
        return math.nan
    return float((y == p).mean())


def _check_bootstrap_args(n: int, n_resamples: int, ci: float) -> None:
    if n == 0:
        raise ValueError("bootstrap needs at least one sample")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")


def _resampled_differences(
    arrays: Sequence[np.ndarray], signs: Sequence[float], n_resamples: int, seed: int, statistic: Statistic
) -> np.ndarray:
    """sum_k signs[k] * statistic(arrays[k][idx]) for n_resamples index draws shared by all arrays.

    Sharing the indices is what makes the paired bootstrap paired: both systems are re-scored on the same
    resampled questions, so question difficulty cancels out of the difference.
    """
    n = arrays[0].shape[0]
    rng = np.random.default_rng(seed)
    fast_mean = statistic is np.mean and all(a.ndim == 1 for a in arrays)
    chunk = max(1, _MAX_INDEX_CELLS // n)
    out = np.empty(n_resamples, dtype=np.float64)
    done = 0
    while done < n_resamples:
        rows = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(rows, n))
        acc = np.zeros(rows, dtype=np.float64)
        for arr, sign in zip(arrays, signs, strict=True):
            if fast_mean:
                vals = arr[idx].mean(axis=1)
            else:
                vals = np.array([float(statistic(arr[row])) for row in idx], dtype=np.float64)
            acc = acc + sign * vals
        out[done : done + rows] = acc
        done += rows
    return out


def _interval(estimate: float, samples: np.ndarray, ci: float) -> ConfidenceInterval:
    alpha = 1.0 - ci
    low, high = np.quantile(samples, [alpha / 2.0, 1.0 - alpha / 2.0])
    return ConfidenceInterval(float(estimate), float(low), float(high))


def _as_samples(scores: Sequence[Any] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a sequence of per-sample scores")
    return arr


def bootstrap_ci(
    scores: Sequence[Any] | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    statistic: Statistic = np.mean,
) -> ConfidenceInterval:
    """(statistic(scores), low, high): percentile bootstrap interval of one system's score.

    `scores` are per-sample values (e.g. per-question VQA accuracy); rows are resampled with replacement, so
    a 2-D array (rows = samples, e.g. columns label and score) works with a custom `statistic`.
    Deterministic for a given seed.
    """
    arr = _as_samples(scores, "scores")
    _check_bootstrap_args(arr.shape[0], n_resamples, ci)
    estimate = float(statistic(arr))
    samples = _resampled_differences([arr], [1.0], int(n_resamples), seed, statistic)
    return _interval(estimate, samples, ci)


def paired_bootstrap_ci(
    a_scores: Sequence[Any] | np.ndarray,
    b_scores: Sequence[Any] | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    statistic: Statistic = np.mean,
) -> ConfidenceInterval:
    """(delta, low, high) for delta = statistic(b) - statistic(a), with a paired percentile bootstrap.

    a_scores[i] and b_scores[i] must be the same sample (question) scored by systems a and b (e.g. baseline
    and quantized model). Each resample draws one set of indices and applies it to both, so the interval
    reflects the uncertainty of the *difference*, which is much tighter than two independent intervals.
    Identical inputs give exactly (0, 0, 0). Deterministic for a given seed.
    """
    a = _as_samples(a_scores, "a_scores")
    b = _as_samples(b_scores, "b_scores")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired bootstrap needs equal-length inputs, got {a.shape[0]} and {b.shape[0]}")
    _check_bootstrap_args(a.shape[0], n_resamples, ci)
    delta = float(statistic(b)) - float(statistic(a))
    samples = _resampled_differences([b, a], [1.0, -1.0], int(n_resamples), seed, statistic)
    return _interval(delta, samples, ci)
