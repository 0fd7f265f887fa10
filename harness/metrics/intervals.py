"""Bootstrap intervals for every metric of a cell, and for the paired difference between two cells.

The statistic is the task's own `aggregate` (combined over trials as `aggregate_trials` does) recomputed on each
resample, so the interval is about exactly the number a table reports: ROC AUC, category accuracies, VQA accuracy
by answer type, the mean over few-shot trials; not about a per-sample proxy. Percentile intervals, seeded: the
same entries give the same interval on every machine.

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

Speed: when every metric of a cell is a group mean (accuracy, category and answer-type accuracies, parse-failure
rate: a mean of per-sample values over the samples of a group), which is recognised by aggregating each record
alone and checked against the task's aggregate on the full set and on a few resamples, all resamples are computed at
once as count-weighted sums (a matrix product). Otherwise (ROC AUC, a precision) the aggregate is called once per
resample; it returns every metric at once, so vectorising the others would save nothing. A metric undefined on a
resample (a category or class absent from it) leaves that resample out; when all are undefined the interval is
(NaN, NaN). `bench/intervals_speed.py` measures both paths.
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
from qvlm_harness.task import Task

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
_PREFIX_SAMPLES = 32  # samples probed first, to rule out vectorising cheaply
_VERIFY_SEED = 20240601  # fixed: verifying must not depend on (or consume) the caller's seed
_PROBE_ROWS, _SLICE_ROWS = 10, 250  # resamples per step of the loop (the budget is checked after each)
GENERIC_BUDGET_S = 300.0  # a cell that needs its aggregate per resample gets no intervals if that takes longer

Entries = Sequence[Mapping[str, Any]]  # per-sample log entries {"trial", "id", "record"}


class IntervalWarning(RuntimeWarning):
    """Intervals were not computed: the cell's aggregate is too slow to recompute on every resample."""


def interval_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """The metrics that get an interval: numeric, not counts (n, n_*, trials), not spreads (*_std, lm-eval's
    *_stderr*), not intervals themselves."""
    return [k for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
            and not (k == "n" or k.startswith("n_") or k == "trials" or k.endswith("_std") or "_stderr" in k
                     or k.endswith(CI_SUFFIXES))]


def interval_columns(intervals: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """{metric: (lo, hi)} -> {"<metric>_ci_lo": lo, "<metric>_ci_hi": hi}, the keys a result row stores."""
    out: dict[str, float] = {}
    for m, (lo, hi) in intervals.items():
        out[f"{m}{CI_SUFFIXES[0]}"], out[f"{m}{CI_SUFFIXES[1]}"] = float(lo), float(hi)
    return out


# -- resampling --------------------------------------------------------------------------------------------------------
class _Samples:
    """A cell's records per trial, grouped by sample id (sorted ids): the unit that is resampled."""

    def __init__(self, entries: Entries, trials: int):
        if trials < 1:
            raise ValueError(f"trials must be >= 1, got {trials}")
        self.trials = trials
        groups: dict[str, list[list[Mapping[str, Any]]]] = {}
        for e in entries:
            t = int(e["trial"])
            if t < trials:
                groups.setdefault(str(e["id"]), [[] for _ in range(trials)])[t].append(e["record"])
        self.ids = sorted(groups)
        self.by_trial = [[groups[i][t] for i in self.ids] for t in range(trials)]  # [trial][sample] -> records
        # one record per sample and trial, the common case: kept as a flat list for fast resampling
        self._single = [[g[0] for g in recs] if all(len(g) == 1 for g in recs) else None for recs in self.by_trial]

    def __len__(self) -> int:
        return len(self.ids)

    def records(self, row: np.ndarray) -> list[list[Mapping[str, Any]]]:
        """Per trial, the records of the samples drawn in `row` (a sample drawn twice counts twice)."""
        js = row.tolist()
        return [[flat[j] for j in js] if flat is not None else [r for j in js for r in recs[j]]
                for flat, recs in zip(self._single, self.by_trial, strict=True)]

    def all_records(self) -> list[list[Mapping[str, Any]]]:
        return self.records(np.arange(len(self)))


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


def _aggregate(task: Task, per_trial_records: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, float]:
    """The metrics `aggregate_trials` reports (the task's aggregate; with several trials its mean over trials),
    without the spreads it adds: they are not resampled, and `statistics.stdev` raises on the NaN a resample can
    produce (one class only)."""
    with warnings.catch_warnings():  # a resample with one class makes AUROC NaN; the interval drops it
        warnings.simplefilter("ignore")
        per_trial = [task.aggregate(recs) for recs in per_trial_records]
    if len(per_trial) == 1:
        return {k: float(v) for k, v in per_trial[0].items() if isinstance(v, int | float)}
    keys = [k for k, v in per_trial[0].items() if isinstance(v, int | float)]
    return {k: statistics.fmean(_number(p.get(k)) for p in per_trial) for k in keys}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


class _Statistic:
    """A cell's metrics on resamples of its samples: vectorised when all are group means, else the aggregate."""

    def __init__(self, task: Task, samples: _Samples, metrics: Sequence[str], budget_s: float, vectorise: bool):
        self.task, self.samples, self.metrics = task, samples, list(metrics)
        self.budget_s = budget_s
        self.sums: dict[str, np.ndarray] = {}
        self.members: dict[str, np.ndarray] = {}
        # The per-resample aggregate computes every metric at once, so vectorising pays only if every metric is a
        # group mean: a cheap check on the first samples rules out the cells with ROC AUC or a precision first.
        if vectorise and self._all_group_means(np.arange(min(len(samples), _PREFIX_SAMPLES))[None, :]):
            self.sums, self.members = self._group_means(len(samples))
            self._all_group_means(np.vstack([np.arange(len(samples))[None, :], np.random.default_rng(
                _VERIFY_SEED).integers(0, len(samples), size=(_VERIFY_RESAMPLES, len(samples)))]))
        self.generic = [m for m in self.metrics if m not in self.sums]
        self._spent, self._done, self.abandoned = 0.0, 0, False

    def _group_means(self, k: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per metric, per trial and sample (the first k): the sum of its records' values and how many records are
        in the metric's group (a record that alone aggregates to NaN is outside it)."""
        t, n = self.samples.trials, len(self.samples)
        sums = {m: np.zeros((t, n)) for m in self.metrics}
        members = {m: np.zeros((t, n)) for m in self.metrics}
        candidates = set(self.metrics)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for trial, per_sample in enumerate(self.samples.by_trial):
                for i, recs in enumerate(per_sample[:k]):
                    for rec in recs:
                        try:
                            alone = self.task.aggregate([rec])
                        except Exception:  # an aggregate that cannot take one record: no metric is vectorised
                            return {}, {}
                        for m in list(candidates):
                            v = _number(alone.get(m))
                            if math.isinf(v) or (m not in alone):
                                candidates.discard(m)
                            elif not math.isnan(v):
                                sums[m][trial, i] += v
                                members[m][trial, i] += 1
        return {m: sums[m] for m in candidates}, {m: members[m] for m in candidates}

    def _all_group_means(self, rows: np.ndarray) -> bool:
        """Keep only the metrics whose group means (from the samples probed so far; probes the rows' samples first
        if nothing is probed yet) equal the task's aggregate on each row; True if every metric is kept."""
        if not self.sums:
            self.sums, self.members = self._group_means(int(rows.max()) + 1)
        predicted = self._vectorised(rows)
        for r, row in enumerate(rows):
            actual = _aggregate(self.task, self.samples.records(row))
            for m in list(self.sums):
                a, p = _number(actual.get(m)), predicted[m][r]
                if not (math.isnan(a) and math.isnan(p)) and not math.isclose(a, p, rel_tol=1e-9, abs_tol=1e-9):
                    del self.sums[m], self.members[m]
        keep = len(self.sums) == len(self.metrics)
        if not keep:
            self.sums, self.members = {}, {}
        return keep

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
                agg = _aggregate(self.task, self.samples.records(row))
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
    (1 otherwise). By default every metric `interval_metrics` selects from the cell's metrics; the bounds are in the
    metric's own units. See the module docstring for how samples and trials are resampled. `vectorise=False`
    recomputes the aggregate on every resample for every metric (same draws, same result; for checks and timing).
    """
    _check_args(level, n_boot)
    samples = _Samples(entries, trials)
    if not len(samples):
        raise ValueError("intervals need at least one sample")
    if metrics is None:
        metrics = interval_metrics(_aggregate(task, samples.all_records()))
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
    full_a, full_b = _aggregate(task, a.all_records()), _aggregate(task, b.all_records())
    if metrics is None:
        metrics = [m for m in interval_metrics(full_a) if m in full_b]
    stats = [_Statistic(task, x, metrics, budget_s, vectorise) for x in (a, b)]
    va, vb = _resample_values(stats, len(a), int(n_boot), seed)
    out = {}
    for m in metrics:
        lo, hi = _percentiles(va[m] - vb[m], level)
        out[m] = ConfidenceInterval(_number(full_a.get(m)) - _number(full_b.get(m)), lo, hi)
    return out

