"""Bootstrap intervals for every metric of a cell, and for the paired difference between two cells.

The statistic is the task's own `aggregate` (through `aggregate_trials`) recomputed on each resample, so the
interval is about exactly the number a table reports: ROC AUC, category accuracies, VQA accuracy by answer type,
the mean over few-shot trials; not about a per-sample proxy. Percentile intervals, seeded: the same entries give
the same interval on every machine.

Resampling unit: a sample id, with all of its trials. Samples are drawn with replacement in the order of their
sorted ids, from `numpy.random.default_rng(seed).integers(0, n, size=(rows, n))` (the same draws as
`qvlm_harness.metrics.classification.bootstrap_ci`).

Few-shot trials (e.g. Hateful Memes, `--trials 3`): the reported metric is the mean over trials of each trial's
aggregate, every trial on the same questions with other seeded demonstrations. A resample redraws the questions
and keeps every trial of each drawn question, then averages the per-trial aggregates. So the interval answers "how
much would this number move on other questions, for this protocol", and it keeps what the trials share (the same
question is hard in every trial). Resampling the trials too (a two-level bootstrap) was rejected: with the 1-3
trials a run has, a bootstrap over trials draws from two or three values, which says little and makes the interval
jumpy; the spread over demonstration seeds is reported on its own as `<metric>_std`.

Speed: metrics that are group means (accuracy, category and answer-type accuracies, parse-failure rate: anything
an aggregate computes as a mean of per-sample values over the samples of a group) are recognised by aggregating
each record alone, then checked against the real aggregate on the full set and on a few resamples; those are
computed for all resamples at once as count-weighted sums (a matrix product). Every other metric (ROC AUC,
precision/recall) calls the aggregate once per resample. A metric whose resample is undefined (a category or class
absent from it) leaves that resample out; when all are undefined the interval is (NaN, NaN).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from qvlm_harness.metrics.classification import ConfidenceInterval
from qvlm_harness.task import Task, aggregate_trials

__all__ = [
    "CI_SUFFIXES",
    "IntervalWarning",
    "cell_intervals",
    "interval_columns",
    "interval_metrics",
    "paired_intervals",
]

CI_SUFFIXES = ("_ci_lo", "_ci_hi")
_MAX_INDEX_CELLS = 4_000_000  # resample indices per chunk, as in classification.py (same draws)
_VERIFY_RESAMPLES = 4  # resamples on which a vectorised group mean must equal the task's aggregate
_VERIFY_SEED = 20240601  # fixed: verifying must not depend on (or consume) the caller's seed
_PROBE_ROWS, _SLICE_ROWS = 10, 250  # resamples per step of the loop (the budget is checked after each)
GENERIC_BUDGET_S = 300.0  # a metric that needs the aggregate per resample gets no interval if it would take longer

Entries = Sequence[Mapping[str, Any]]  # per-sample log entries {"trial", "id", "record"}


class IntervalWarning(RuntimeWarning):
    """An interval was not computed (its aggregate is too slow to recompute on every resample)."""


def interval_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """The metrics that get an interval: numeric, not counts (n, n_*, trials), not spreads (*_std, lm-eval's
    *_stderr*), not intervals themselves."""
    return [k for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
            and not (k == "n" or k.startswith("n_") or k == "trials" or k.endswith("_std") or "_stderr" in k
                     or k.endswith(CI_SUFFIXES))]


def interval_columns(intervals: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """{metric: (lo, hi)} -> {"<metric>_ci_lo": lo, "<metric>_ci_hi": hi}, the keys a result row stores."""
    return {f"{m}{suffix}": float(v) for m, (lo, hi) in intervals.items() for suffix, v in zip(CI_SUFFIXES, (lo, hi),
                                                                                              strict=True)}


# -- resampling --------------------------------------------------------------------------------------------------------
class _Samples:
    """A cell's entries grouped by sample id (sorted), the unit that is resampled."""

    def __init__(self, entries: Entries, trials: int):
        if trials < 1:
            raise ValueError(f"trials must be >= 1, got {trials}")
        self.trials = trials
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for e in entries:
            if int(e["trial"]) < trials:
                groups.setdefault(str(e["id"]), []).append(e)
        self.ids = sorted(groups)
        self.groups = [groups[i] for i in self.ids]
        self._single = [g[0] for g in self.groups] if all(len(g) == 1 for g in self.groups) else None

    def __len__(self) -> int:
        return len(self.ids)

    def entries(self, row: np.ndarray) -> list[Mapping[str, Any]]:
        if self._single is not None:  # one entry per sample (one trial): the common case, kept fast
            return [self._single[j] for j in row.tolist()]
        return [e for j in row.tolist() for e in self.groups[j]]


def _draws(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_INDEX_CELLS // n)
    done = 0
    while done < n_boot:
        rows = min(chunk, n_boot - done)
        yield rng.integers(0, n, size=(rows, n))
        done += rows


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each sample is drawn in each resample: (rows, n)."""
    rows = idx.shape[0]
    flat = (idx + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _aggregate(task: Task, entries: Sequence[Mapping[str, Any]], trials: int) -> dict[str, float]:
    """The metrics of `aggregate_trials` (the task's aggregate, or its mean over trials), without the spreads it
    adds: they are not resampled, and `statistics.stdev` raises on the NaN a resample can produce (one class)."""
    with warnings.catch_warnings():  # a resample with one class makes AUROC NaN; the interval drops it
        warnings.simplefilter("ignore")
        if trials == 1:
            return aggregate_trials(task, entries, 1)
        per_trial = [task.aggregate([e["record"] for e in entries if e["trial"] == t]) for t in range(trials)]
    keys = [k for k, v in per_trial[0].items() if isinstance(v, int | float)]
    return {k: statistics.fmean(_number(p.get(k)) for p in per_trial) for k in keys}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


class _Statistic:
    """A cell's metrics on resamples of its samples: group means vectorised, other metrics by the aggregate."""

    def __init__(self, task: Task, samples: _Samples, metrics: Sequence[str], budget_s: float, vectorise: bool):
        self.task, self.samples, self.metrics = task, samples, list(metrics)
        self.budget_s = budget_s
        self.sums, self.members = self._group_means() if vectorise else ({}, {})
        self._verify()
        self.generic = [m for m in self.metrics if m not in self.sums]
        self._spent, self._done, self.abandoned = 0.0, 0, False

    def _group_means(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per metric, per trial and sample: the sum of its records' values and how many records are in the
        metric's group (a record alone aggregating to NaN is outside it)."""
        t, n = self.samples.trials, len(self.samples)
        sums = {m: np.zeros((t, n)) for m in self.metrics}
        members = {m: np.zeros((t, n)) for m in self.metrics}
        candidates = set(self.metrics)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, group in enumerate(self.samples.groups):
                for e in group:
                    try:
                        alone = self.task.aggregate([e["record"]])
                    except Exception:  # an aggregate that cannot take one record: no metric is vectorised
                        return {}, {}
                    for m in list(candidates):
                        v = _number(alone.get(m))
                        if math.isinf(v) or (m not in alone):
                            candidates.discard(m)
                        elif not math.isnan(v):
                            sums[m][int(e["trial"]), i] += v
                            members[m][int(e["trial"]), i] += 1
        return {m: sums[m] for m in candidates}, {m: members[m] for m in candidates}

    def _verify(self) -> None:
        """Keep a metric vectorised only if it equals the task's aggregate on the full set and on resamples."""
        if not self.sums:
            return
        n = len(self.samples)
        rows = np.vstack([np.arange(n)[None, :], np.random.default_rng(_VERIFY_SEED).integers(
            0, n, size=(_VERIFY_RESAMPLES, n))])
        predicted = self._vectorised(rows)
        for r, row in enumerate(rows):
            actual = _aggregate(self.task, self.samples.entries(row), self.samples.trials)
            for m in list(self.sums):
                a, p = _number(actual.get(m)), predicted[m][r]
                if not (math.isnan(a) and math.isnan(p)) and not math.isclose(a, p, rel_tol=1e-9, abs_tol=1e-9):
                    del self.sums[m], self.members[m]

    def _vectorised(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        counts = _counts(idx, len(self.samples))
        out = {}
        for m, sums in self.sums.items():
            num, den = counts @ sums.T, counts @ self.members[m].T  # (rows, trials)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_trial = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
            out[m] = per_trial.mean(axis=1)  # NaN in one trial makes the mean NaN, as in aggregate_trials
        return out

    def values(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric on every resample (row) of `idx`."""
        out = self._vectorised(idx)
        generic = {m: np.full(idx.shape[0], np.nan) for m in self.generic}
        if self.generic and not self.abandoned:
            start = time.perf_counter()
            for r, row in enumerate(idx):
                agg = _aggregate(self.task, self.samples.entries(row), self.samples.trials)
                for m in self.generic:
                    generic[m][r] = _number(agg.get(m))
            self._spent += time.perf_counter() - start
            self._done += idx.shape[0]
        return out | generic

    def over_budget(self, n_boot: int) -> bool:
        """After the first chunk: would the per-resample aggregate take longer than the budget for n_boot?"""
        if self.generic and not self.abandoned and self._done and self._spent / self._done * n_boot > self.budget_s:
            self.abandoned = True
            warnings.warn(f"no interval for {', '.join(self.generic)}: recomputing the aggregate {n_boot} times "
                          f"would take ~{self._spent / self._done * n_boot:.0f} s (budget {self.budget_s:.0f} s)",
                          IntervalWarning, stacklevel=3)
        return self.abandoned


def _slices(idx: np.ndarray, first: int) -> Iterator[np.ndarray]:
    start, size = 0, first
    while start < idx.shape[0]:
        yield idx[start:start + size]
        start, size = start + size, _SLICE_ROWS


def _resample_values(stats: Sequence[_Statistic], n: int, n_boot: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Every metric of every statistic on the same n_boot resamples (the same draws for all: pairing)."""
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in stats]
    first = _PROBE_ROWS  # a small first slice, so an aggregate too slow for the budget is stopped early
    for idx in _draws(n, n_boot, seed):
        for part in _slices(idx, first):
            for s, out in zip(stats, parts, strict=True):
                out.append(s.values(part))
                s.over_budget(n_boot)
        first = _SLICE_ROWS
    merged = []
    for s, chunks in zip(stats, parts, strict=True):
        vals = {m: np.concatenate([c[m] for c in chunks]) for m in s.metrics}
        if s.abandoned:
            vals |= {m: np.full(n_boot, np.nan) for m in s.generic}
        merged.append(vals)
    return merged


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    defined = values[np.isfinite(values)]
    if defined.size == 0:
        return math.nan, math.nan
    alpha = 1.0 - level
    lo, hi = np.quantile(defined, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _check_args(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")


# -- public ----------------------------------------------------------------------------------------------------------
def cell_intervals(task: Task, entries: Entries, trials: int, *, level: float = 0.95, n_boot: int = 1000,
                   seed: int = 0, metrics: Sequence[str] | None = None, budget_s: float = GENERIC_BUDGET_S,
                   vectorise: bool = True) -> dict[str, tuple[float, float]]:
    """{metric: (lo, hi)}: percentile bootstrap interval of each metric the task reports for this cell.

    `entries` are the cell's per-sample log entries ({"trial", "id", "record"}), `trials` its few-shot trial count
    (1 otherwise). By default every metric of `interval_metrics(aggregate_trials(...))`; the bounds are in the
    metric's own units. See the module docstring for how samples and trials are resampled. `vectorise=False`
    recomputes the aggregate on every resample for every metric (same draws, same result; for checks and timing).
    """
    _check_args(level, n_boot)
    samples = _Samples(entries, trials)
    if not len(samples):
        raise ValueError("intervals need at least one sample")
    if metrics is None:
        metrics = interval_metrics(_aggregate(task, [e for g in samples.groups for e in g], trials))
    stat = _Statistic(task, samples, metrics, budget_s, vectorise)
    (values,) = _resample_values([stat], len(samples), int(n_boot), seed)
    return {m: _percentiles(values[m], level) for m in metrics}


def paired_intervals(task: Task, entries_a: Entries, entries_b: Entries, trials: int, *, level: float = 0.95,
                     n_boot: int = 1000, seed: int = 0, metrics: Sequence[str] | None = None,
                     budget_s: float = GENERIC_BUDGET_S, vectorise: bool = True) -> dict[str, ConfidenceInterval]:
    """{metric: (A - B, lo, hi)}: the paired bootstrap interval of the difference between two cells scored on the
    same samples (and trials): every resample draws one set of sample ids and recomputes both cells' aggregates on
    it, so what the samples share (difficulty) cancels out of the difference. Raises ValueError when the two cells
    do not hold the same sample ids."""
    _check_args(level, n_boot)
    a, b = _Samples(entries_a, trials), _Samples(entries_b, trials)
    if a.ids != b.ids:
        only = sorted(set(a.ids) ^ set(b.ids))
        raise ValueError(f"paired intervals need the same samples in both cells; {len(only)} ids differ "
                         f"(e.g. {only[0]})")
    if not len(a):
        raise ValueError("intervals need at least one sample")
    full_a = _aggregate(task, [e for g in a.groups for e in g], trials)
    full_b = _aggregate(task, [e for g in b.groups for e in g], trials)
    if metrics is None:
        metrics = [m for m in interval_metrics(full_a) if m in full_b]
    stats = [_Statistic(task, x, metrics, budget_s, vectorise) for x in (a, b)]
    va, vb = _resample_values(stats, len(a), int(n_boot), seed)
    out = {}
    for m in metrics:
        lo, hi = _percentiles(va[m] - vb[m], level)
        out[m] = ConfidenceInterval(_number(full_a.get(m)) - _number(full_b.get(m)), lo, hi)
    return out

