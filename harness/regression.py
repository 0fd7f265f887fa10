"""Regression tracking: compare a run against a baseline, metric by metric, with paired bootstrap intervals.

A *baseline* is a JSON file (results/baselines/<name>.json) holding, for every cell (method x bits x task x
shots), its metrics and its per-sample records, so a later run can be paired with it sample by sample: the same
questions answered by the old and the new code. The change of each metric comes with a seeded paired bootstrap
interval (`qvlm_harness.metrics.classification.paired_bootstrap_ci`), where the statistic is the task's own
`aggregate` recomputed on each resample: the interval is about exactly the number the tables report (ROC AUC,
category accuracies, the mean over few-shot trials), not about a proxy.

A check fails when
- a gated metric is *significantly* worse than the baseline: the whole interval lies beyond `min_drop` on the bad
  side (so sample noise, whose interval straddles zero, never fails a build), or
- a quantized cell's metric falls significantly below `recovery` x the FP model's (llm-compressor's regression
  rule, quantized >= 0.95 x base; "significantly": the paired interval of quantized - threshold x FP on the same
  questions lies below zero, so one flipped answer in a small suite does not fail it, it is shown as
  near-recovery), unless the baseline was already below the threshold for that cell: a known lossy setting (e.g.
  w4a4 on a small model) is reported, and fails only if it also drops significantly;
- a cell of the baseline is missing from the run (the suite changed without a new baseline).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qvlm_harness import __version__, plugins
from qvlm_harness.activations import activations_of
from qvlm_harness.errors import HarnessError
from qvlm_harness.metrics.classification import ConfidenceInterval, paired_bootstrap_ci
from qvlm_harness.store import ResultRow, SampleLog, Store, _dumps
from qvlm_harness.task import Task, aggregate_trials

BASELINE_FORMAT = "qvlm-harness-baseline"
BASELINE_VERSION = 1
FP_PREFERENCE = plugins.FLOAT_BASELINES  # which unquantized cell recovery is measured against
DEFAULT_RECOVERY = 0.95

CellKey = tuple[str, str, str, int, str]  # (method, bits, task, shots, scoring)


@dataclass
class CellScores:
    """One cell's metrics and per-sample log entries ({"trial", "id", "record"}), from a store or a baseline."""

    method: str
    bits: str
    task: str
    shots: int
    metrics: dict[str, float]
    entries: list[dict[str, Any]]
    trials: int = 1
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def scoring(self) -> str:
        """How the task was scored (generate, loglik, ...): one suite may hold a task scored both ways, and the two
        are different cells (and the FP reference of each is the FP cell scored the same way)."""
        return str(self.info.get("scoring") or "")

    @property
    def key(self) -> CellKey:
        return (self.method, self.bits, self.task, self.shots, self.scoring)

    @property
    def task_label(self) -> str:
        return f"{self.task}{f' {self.shots}-shot' if self.shots else ''}{f' ({self.scoring})' if self.scoring else ''}"

    @property
    def label(self) -> str:
        return f"{self.method} {self.bits} {self.task_label}"

    @property
    def is_float(self) -> bool:
        return self.bits == "fp"


# -- reading cells ---------------------------------------------------------------------------------------------------
def samples_log_path(row: ResultRow, store_path: Path) -> Path:
    """Where the runner wrote a row's per-sample log: recorded in its settings, else the default layout
    <output>/<model>/samples/<cell_id>.jsonl next to the store (also when the folder was moved)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in row.model)
    layout = Path(store_path).parent / safe / "samples" / f"{row.cell_id}.jsonl"
    recorded = row.settings.get("samples_log")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    return layout


def cell_from_row(row: ResultRow, store_path: Path) -> CellScores:
    path = samples_log_path(row, store_path)
    if not path.is_file():
        raise HarnessError(f"per-sample log of {row.method} {row.bits} {row.task} not found at {path}; comparisons "
                           "pair samples, so keep the <output>/<model>/samples/ folder written by `harness run`")
    trials = int(row.settings.get("trials", 1) or 1)
    entries: dict[str, dict] = {}
    for e in SampleLog(path).read():
        if e.get("trial", 0) < trials:
            entries[e["key"]] = {"trial": e["trial"], "id": e["id"], "record": e["record"]}
    return CellScores(
        method=row.method_label, bits=row.bits, task=row.task, shots=row.shots, metrics=dict(row.metrics),
        entries=list(entries.values()), trials=trials, model=row.model,
        info={"cell_id": row.cell_id, "run_id": row.run_id, "model_fingerprint": row.model_fingerprint,
              "data_fingerprint": row.data_fingerprint, "n_samples": row.n_samples, "sample_limit": row.sample_limit,
              "seed": row.seed, "split": row.split, "scoring": row.scoring, "execution": row.execution,
              "git": row.environment.get("git"), "harness_version": row.environment.get("harness_version"),
              "task_options": row.settings.get("task_options") or {},
              "activations": activations_of(row.method, row.bits, row.settings.get("activations"))},
    )


def select_rows(store: Store, *, run_id: str | None = None, model: str | None = None) -> list[ResultRow]:
    """Rows of one run (or of the whole store), one per (method with its rotation, bits, task, shots, scoring):
    the newest wins."""
    rows = list(store.rows(run_id=run_id)) if run_id else list(store.rows())
    if model is not None:
        rows = [r for r in rows if r.model == model]
    if not rows:
        what = f"run {run_id!r}" if run_id else "results"
        raise HarnessError(f"no {what}{f' for model {model}' if model else ''} in {store.path}; run `harness run` "
                           "first or pass --store/--output of the folder holding harness.db")
    models = sorted({r.model for r in rows})
    if len(models) > 1:
        raise HarnessError(f"{store.path} holds results of several models ({', '.join(models)}); pick one with "
                           "--model or a run with --run")
    newest: dict[CellKey, ResultRow] = {}
    for r in rows:  # ordered by creation time
        newest[(r.method_label, r.bits, r.task, r.shots, r.scoring or "")] = r
    return list(newest.values())


def cells_from_store(store: Store, *, run_id: str | None = None, model: str | None = None) -> list[CellScores]:
    return [cell_from_row(r, store.path) for r in select_rows(store, run_id=run_id, model=model)]


# -- baseline files --------------------------------------------------------------------------------------------------
def baseline_path(name_or_path: str | Path, folder: Path) -> Path:
    """A baseline given as a path (anything ending in .json or containing a slash) or as a name in `folder`."""
    text = str(name_or_path)
    if text.endswith(".json") or "/" in text:
        return Path(text)
    return folder / f"{text}.json"


def save_baseline(cells: Sequence[CellScores], path: Path, *, name: str, source: Mapping[str, Any]) -> Path:
    """Write a baseline file: header, then one cell per block with one per-sample record per line (diffable)."""
    if not cells:
        raise HarnessError("nothing to save: the selected run has no cells")
    head = {"format": BASELINE_FORMAT, "version": BASELINE_VERSION, "name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "harness_version": __version__,
            "model": cells[0].model, "source": dict(source)}
    lines = ["{"] + [f" {json.dumps(k)}: {_dumps(v)}," for k, v in head.items()] + [' "cells": [']
    for i, c in enumerate(sorted(cells, key=lambda c: c.key)):
        meta = {"method": c.method, "bits": c.bits, "task": c.task, "shots": c.shots, "trials": c.trials,
                "model": c.model, "metrics": c.metrics, "info": c.info}
        lines.append("  {" + ", ".join(f"{json.dumps(k)}: {_dumps(v)}" for k, v in meta.items()) + ', "samples": [')
        samples = sorted(c.entries, key=lambda e: (e["trial"], e["id"]))
        lines += ["   " + _dumps(e) + ("," if j < len(samples) - 1 else "") for j, e in enumerate(samples)]
        lines.append("  ]}" + ("," if i < len(cells) - 1 else ""))
    lines += [" ]", "}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_baseline(path: Path) -> tuple[dict[str, Any], list[CellScores]]:
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        hint = f" (known: {', '.join(known)})" if known else ""
        raise HarnessError(f"baseline {path} not found{hint}; write one with `harness compare --save-baseline NAME`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HarnessError(f"baseline {path} is not a text file; pass a baseline written by "
                           "`harness compare --save-baseline NAME`") from None
    except json.JSONDecodeError as exc:
        raise HarnessError(f"baseline {path} is not valid JSON ({exc.msg} at line {exc.lineno}); rewrite it with "
                           "`harness compare --save-baseline`") from None
    if (not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT
            or data.get("version") != BASELINE_VERSION):
        raise HarnessError(f"{path} is not a qvlm-harness baseline (format {BASELINE_FORMAT} v{BASELINE_VERSION}); "
                           "write one with `harness compare --save-baseline NAME`")
    try:
        cells = [CellScores(method=c["method"], bits=c["bits"], task=c["task"], shots=int(c["shots"]),
                            metrics={k: (math.nan if v is None else float(v)) for k, v in c["metrics"].items()},
                            entries=list(c["samples"]), trials=int(c.get("trials", 1)), model=c.get("model", ""),
                            info=c.get("info", {}))
                 for c in data["cells"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HarnessError(f"baseline {path} has a malformed cell ({type(exc).__name__}: {exc}); rewrite it with "
                           "`harness compare --save-baseline NAME`") from None
    meta = {k: v for k, v in data.items() if k != "cells"}
    return meta, cells


# -- comparison ------------------------------------------------------------------------------------------------------
@dataclass
class MetricCheck:
    """One metric of one cell: baseline vs current, the paired interval of the change, and the verdict."""

    cell: str
    key: CellKey
    metric: str
    baseline: float | None
    current: float
    delta: ConfidenceInterval | None
    n_paired: int
    recovery: float | None = None
    recovery_threshold: float | None = None
    baseline_recovery: float | None = None
    recovery_margin: ConfidenceInterval | None = None  # current - threshold x FP (paired): high < 0 = significant
    gated: bool = True
    lower_is_better: bool = False  # the task declares a drop an improvement (e.g. a parse-failure rate)
    status: str = "ok"  # ok | improved | regressed | below-recovery | near-recovery | known-below-recovery | ...
    reasons: list[str] = field(default_factory=list)
    activations: str = ""  # the cell's activation quantizer (`qvlm_harness.activations`), for the table

    @property
    def failed(self) -> bool:
        return self.gated and self.status in ("regressed", "below-recovery")


@dataclass
class Comparison:
    checks: list[MetricCheck]
    missing: list[str] = field(default_factory=list)  # baseline cells absent from the run
    stale: list[str] = field(default_factory=list)  # cells whose baseline was made with other model weights
    notes: list[str] = field(default_factory=list)
    ci: float = 0.95

    @property
    def failures(self) -> list[MetricCheck]:
        return [c for c in self.checks if c.failed]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.missing and not self.stale


def comparable_metrics(metrics: Mapping[str, float]) -> list[str]:
    """The metrics worth a delta: not counts (n, n_*), not spreads (*_std), not the trial count, not the stored
    interval bounds (*_ci_lo, *_ci_hi)."""
    return [k for k, v in metrics.items()
            if not (k == "n" or k.startswith("n_") or k.endswith("_std") or k == "trials"
                    or k.endswith(("_ci_lo", "_ci_hi")))
            and isinstance(v, int | float)]


def _group_by_id(entries: Iterable[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in entries:
        out.setdefault(str(e["id"]), []).append(e)
    return out


class _PairedStatistic:
    """task.aggregate on a resample of paired sample ids, cached per index draw: `paired_bootstrap_ci` is called
    once per metric with the same seed, so every metric after the first reuses the aggregates of the first."""

    def __init__(self, task: Task, base: CellScores, cur: CellScores, *, base_scale: float = 1.0):
        self.base_scale = base_scale  # recovery test: current - threshold x FP, on the same resampled questions
        b, c = _group_by_id(base.entries), _group_by_id(cur.entries)
        self.ids = sorted(set(b) & set(c))
        self.trials = min(base.trials, cur.trials)
        self.groups = [b[i] for i in self.ids] + [c[i] for i in self.ids]
        self.task = task
        self._cache: dict[bytes, dict[str, float]] = {}

    def metrics(self, idx: np.ndarray) -> dict[str, float]:
        key = idx.tobytes()
        if key not in self._cache:
            entries = [e for j in idx for e in self.groups[int(j)] if e["trial"] < self.trials]
            with warnings.catch_warnings():  # a resample with one class makes AUROC NaN; the interval says so
                warnings.simplefilter("ignore")
                self._cache[key] = aggregate_trials(self.task, entries, self.trials)
        return self._cache[key]

    def interval(self, metric: str, *, n_resamples: int, seed: int, ci: float) -> ConfidenceInterval:
        n = len(self.ids)
        a = np.arange(n, dtype=np.float64)
        def statistic(idx: np.ndarray) -> float:
            value = self.metrics(idx).get(metric, math.nan)
            return self.base_scale * value if idx.size and idx[0] < n else value  # a side holds indices < n

        return paired_bootstrap_ci(a, a + n, n_resamples=n_resamples, seed=seed, ci=ci, statistic=statistic)


def _fp_reference(cells: Mapping[CellKey, CellScores], of: CellScores) -> CellScores | None:
    fps = {c.method: c for c in cells.values()
           if c.is_float and (c.task, c.shots, c.scoring) == (of.task, of.shots, of.scoring)}
    for name in FP_PREFERENCE:
        if name in fps:
            return fps[name]
    return next(iter(fps.values()), None)


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or not math.isfinite(value) or not math.isfinite(reference):
        return None
    return value / reference if reference > 0 else None


def compare(current: Sequence[CellScores], baseline: Sequence[CellScores], *, gate: str | Sequence[str] = "primary",
            recovery: float = DEFAULT_RECOVERY, recovery_for: Mapping[str, float] | None = None,
            ci: float = 0.95, n_resamples: int = 1000, seed: int = 0, min_drop: float = 0.0,
            allow_model_change: bool = False) -> Comparison:
    """Check every cell of `current` against the matching cell of `baseline` (same method, bits, task, shots,
    scoring).

    gate: "primary" (each task's primary metric decides), "all", or a list of metric names; other metrics are
    reported but never fail. recovery_for: per-bits thresholds overriding `recovery` (e.g. {"w4a4": 0.5}).
    A baseline made with other model weights (fingerprints differ) is stale and fails the comparison, unless
    `allow_model_change` (comparing two models on purpose).
    """
    if not 0 < ci < 1:
        raise HarnessError(f"--ci must be in (0, 1), got {ci}")
    recovery_for = dict(recovery_for or {})
    cur = {c.key: c for c in current}
    base = {c.key: c for c in baseline}
    comp = Comparison(checks=[], ci=ci)
    comp.missing = [base[k].label for k in sorted(base) if k not in cur]
    tasks: dict[str, Task] = {}
    for key in sorted(cur):
        c = cur[key]
        if c.task not in tasks:  # lmeval:<task> cells need their --lmeval-include folder to rebuild the task
            tasks[c.task] = plugins.tasks.get(c.task)(**(c.info.get("task_options") or {}))
        task = tasks[c.task]
        b = base.get(key)
        gated = _gated_metrics(task, c, gate)
        lower_is_better = set(task.metadata().lower_is_better)
        paired = None
        if b is not None:
            paired = _PairedStatistic(task, b, c)
            _note_mismatches(comp, b, c, len(paired.ids))
            fb, fc = b.info.get("model_fingerprint"), c.info.get("model_fingerprint")
            if fb and fc and fb != fc and not allow_model_change:
                comp.stale.append(f"{c.label} (baseline model {fb}, run {fc})")
        fp_cur = _fp_reference(cur, c)
        fp_base = _fp_reference(base, c)
        threshold = recovery_for.get(c.bits, recovery)
        for metric in sorted(comparable_metrics(c.metrics), key=lambda m: m not in gated):
            check = MetricCheck(cell=c.label, key=key, metric=metric, baseline=None, current=c.metrics[metric],
                                delta=None, n_paired=0, gated=metric in gated,
                                lower_is_better=metric in lower_is_better,
                                activations=activations_of(c.method.partition("+")[0], c.bits,
                                                           c.info.get("activations")))
            if paired is not None and paired.ids and metric in b.metrics:
                check.baseline = b.metrics[metric]
                check.n_paired = len(paired.ids)
                check.delta = paired.interval(metric, n_resamples=n_resamples, seed=seed, ci=ci)
            fp_ref = fp_cur or fp_base
            if not c.is_float and not check.lower_is_better and fp_ref is not None:
                check.recovery = _ratio(c.metrics[metric], fp_ref.metrics.get(metric))
                check.recovery_threshold = threshold
                if b is not None and fp_base is not None:
                    check.baseline_recovery = _ratio(b.metrics.get(metric), fp_base.metrics.get(metric))
                if check.recovery is not None and check.recovery < threshold:
                    margin = _PairedStatistic(task, fp_ref, c, base_scale=threshold)
                    if margin.ids:
                        check.recovery_margin = margin.interval(metric, n_resamples=n_resamples, seed=seed, ci=ci)
            _judge(check, min_drop)
            comp.checks.append(check)
    return comp


def _gated_metrics(task: Task, cell: CellScores, gate: str | Sequence[str]) -> set[str]:
    if gate == "primary":
        return {task.primary_metric}
    if gate == "all":
        return set(comparable_metrics(cell.metrics))
    return set(gate)


def _note_mismatches(comp: Comparison, b: CellScores, c: CellScores, n_paired: int) -> None:
    for field_name, what in (("model_fingerprint", "model weights"), ("data_fingerprint", "evaluation samples"),
                             ("scoring", "scoring mode")):
        bv, cv = b.info.get(field_name), c.info.get(field_name)
        if bv and cv and bv != cv:
            comp.notes.append(f"{c.label}: {what} differ from the baseline ({field_name} {bv} -> {cv})")
    n_cur = len(_group_by_id(c.entries))
    n_base = len(_group_by_id(b.entries))
    if n_paired < max(n_cur, n_base):
        comp.notes.append(f"{c.label}: {n_paired} samples paired (baseline {n_base}, run {n_cur}); deltas are on "
                          "the paired samples only")
    if b.trials != c.trials:
        comp.notes.append(f"{c.label}: baseline has {b.trials} trials, run {c.trials}; compared on the common ones")


def _judge(check: MetricCheck, min_drop: float) -> None:
    lower_better = check.lower_is_better
    statuses = []
    d = check.delta
    if d is None:
        statuses.append("new" if check.baseline is None else "n/a")
    elif not (math.isfinite(d.low) and math.isfinite(d.high)):
        statuses.append("n/a")
        check.reasons.append("interval undefined (a resample lacked a class or category)")
    else:
        worse = d.low > min_drop if lower_better else d.high < -min_drop
        better = d.high < -min_drop if lower_better else d.low > min_drop
        if worse:
            statuses.append("regressed")
            check.reasons.append(f"{check.metric} {d.estimate:+.2f} [{d.low:+.2f}, {d.high:+.2f}] vs baseline")
        elif better:
            statuses.append("improved")
    if check.recovery is not None and check.recovery_threshold is not None \
            and check.recovery < check.recovery_threshold:
        known = check.baseline_recovery is not None and check.baseline_recovery < check.recovery_threshold
        m = check.recovery_margin
        significant = m is not None and math.isfinite(m.high) and m.high < 0
        if known:
            statuses.append("known-below-recovery")
        elif significant:
            statuses.append("below-recovery")
        else:
            statuses.append("near-recovery")
        check.reasons.append(f"recovery {check.recovery:.3f} < {check.recovery_threshold:.2f} x FP"
                             + (f" (baseline already {check.baseline_recovery:.3f})" if known else "")
                             + ("" if known or m is None else f", {'significantly' if significant else 'within noise'}"
                                f": current - {check.recovery_threshold:.2f} x FP in [{m.low:+.2f}, {m.high:+.2f}]"))
    for s in ("regressed", "below-recovery", "near-recovery", "known-below-recovery", "improved", "new", "n/a"):
        if s in statuses:
            check.status = s
            return
    check.status = "ok"


# -- output ----------------------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_comparison(comp: Comparison, *, only_gated: bool = False) -> str:
    """A Markdown table (one line per cell x metric) and a verdict that names every regression."""
    from tabulate import tabulate

    pct = f"{round(100 * comp.ci)}% CI"
    rows = []
    for c in comp.checks:
        if only_gated and not c.gated:
            continue
        method, bits, task, shots, scoring = c.key
        status = c.status.upper() if c.failed else c.status + ("" if c.gated or c.status == "ok" else " (not gated)")
        interval = f"[{_fmt(c.delta.low, '+.2f')}, {_fmt(c.delta.high, '+.2f')}]" if c.delta else "-"
        rows.append([method, bits, c.activations, task + (f" {shots}-shot" if shots else "")
                     + (f" ({scoring})" if scoring else ""),
                     c.metric + ("" if c.gated else "*"),
                     _fmt(c.baseline), _fmt(c.current), _fmt(c.delta.estimate, "+.2f") if c.delta else "-",
                     interval, _fmt(c.recovery, ".3f"), c.n_paired, status])
    head = ["Method", "Bits", "Activations", "Task", "Metric", "Baseline", "Current", "Delta", pct, "Recovery", "N",
            "Status"]
    out = [tabulate(rows, headers=head, tablefmt="github", disable_numparse=True),
           "", "* reported, not gated (gate with --gate all or --gate METRIC,...)"]
    out += [f"note: {n}" for n in comp.notes]
    for label in comp.missing:
        out.append(f"MISSING: {label} is in the baseline but not in this run (rerun the suite or save a new baseline)")
    for label in comp.stale:
        out.append(f"STALE BASELINE: {label}: the baseline was made with other model weights; regenerate it "
                   "(scripts/regression.sh --save) or pass --allow-model-change to compare two models on purpose")
    failures = comp.failures
    if failures or comp.missing or comp.stale:
        extra = (f", {len(comp.missing)} cell(s) missing" if comp.missing else "") + \
            (f", {len(comp.stale)} cell(s) with a stale baseline" if comp.stale else "")
        out.append(f"\nREGRESSION: {len(failures)} check(s) failed{extra}:")
        out += [f"  - {c.cell}: " + "; ".join(c.reasons) for c in failures]
    else:
        out.append(f"\nOK: no regression in {sum(c.gated for c in comp.checks)} gated checks "
                   f"({len(comp.checks)} metrics compared)")
    return "\n".join(out)


def comparison_to_dict(comp: Comparison) -> dict[str, Any]:
    return {"ok": comp.ok, "ci": comp.ci, "missing": comp.missing, "stale": comp.stale, "notes": comp.notes, "checks": [
        {"cell": c.cell, "method": c.key[0], "bits": c.key[1], "task": c.key[2], "shots": c.key[3],
         "scoring": c.key[4],
         "metric": c.metric, "baseline": c.baseline, "current": c.current,
         "delta": None if c.delta is None else c.delta._asdict(), "n_paired": c.n_paired, "recovery": c.recovery,
         "recovery_threshold": c.recovery_threshold, "baseline_recovery": c.baseline_recovery, "gated": c.gated,
         "lower_is_better": c.lower_is_better,
         "recovery_margin": None if c.recovery_margin is None else c.recovery_margin._asdict(),
         "status": c.status, "failed": c.failed, "reasons": c.reasons} for c in comp.checks]}
