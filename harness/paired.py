"""Is method A better than method B? A paired comparison of two methods on the same samples, from the store.

For every task (and shot count) and every bits both methods were run at, the per-sample records of the two cells
are paired on sample id and trial, and the paired bootstrap interval of A - B
(`qvlm_harness.metrics.intervals.paired_intervals`: the task's own aggregate on each resample, one draw of sample
ids for both cells) says whether A is significantly better, significantly worse, or not distinguishable from B
(the interval contains 0). A float method (run at "fp" only) is paired with every bits of the other method, so
`--methods rtn,fp32` compares each quantized cell with the float model.

Two cells computed on different samples cannot be paired: other sample ids, another data fingerprint (data folder,
split, seed), another --limit, another trial count, or, for few-shot cells, another seed (other demonstrations).
Such a pair is refused in one line before any resampling, instead of mixing the methods' difference with the
samples'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qvlm_harness import plugins
from qvlm_harness.activations import computed_bits, row_activations
from qvlm_harness.errors import HarnessError, UnknownNameError
from qvlm_harness.metrics.classification import ConfidenceInterval
from qvlm_harness.metrics.intervals import interval_metrics, paired_intervals
from qvlm_harness.regression import cell_from_row, select_rows
from qvlm_harness.store import ResultRow, Store
from qvlm_harness.task import Task

FLOAT_BITS = "fp"


@dataclass
class PairedResult:
    """One metric of one (task, shots, bits) pair: both values, A - B with its paired interval, and the verdict."""

    task: str
    shots: int
    bits_a: str
    bits_b: str
    metric: str
    a: float
    b: float
    delta: ConfidenceInterval
    n_paired: int
    trials: int
    verdict: str  # "better" | "worse" | "not distinguishable" | "undefined" (A relative to B)
    lower_is_better: bool = False  # from the task's metadata
    activations_a: str = ""  # the activation quantizer of each side (`qvlm_harness.activations`)
    activations_b: str = ""

    @property
    def activations_label(self) -> str:
        a, b = self.activations_a, self.activations_b
        return a if a == b else f"{a} / {b}"

    @property
    def task_label(self) -> str:
        return self.task + (f" {self.shots}-shot" if self.shots else "")

    @property
    def bits_label(self) -> str:
        return self.bits_a if self.bits_a == self.bits_b else f"{self.bits_a} / {self.bits_b}"


@dataclass
class MethodComparison:
    method_a: str
    method_b: str
    ci: float
    n_resamples: int
    seed: int
    results: list[PairedResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _method_name(name: str) -> str:
    """A method as rows are told apart (`ResultRow.method_label`): its canonical name, with ``+rotation`` kept."""
    base, plus, rotation = name.strip().partition("+")
    try:
        base = plugins.methods.resolve_name(base)
    except UnknownNameError:
        base = base.strip()  # a method whose plugin is not installed here can still be read from the store
    return f"{base}+{rotation.strip()}" if plus else base


def pair_rows(rows: Sequence[ResultRow], a: str, b: str) -> list[tuple[ResultRow, ResultRow]]:
    """(row of A, row of B) per task, shots and computed bits both have; a float method's "fp" row pairs with
    every bits of the other method that has no "fp" row of its own.

    Rows pair on what they computed (`computed_bits`: weights and the activation quantizer), not on their labels:
    qvlm's ``w4a4`` (per-token) pairs with qvlm-official's ``w4a4-token``, and qvlm-official's bare ``w4a4`` (its
    released per-input-channel ranges) with qvlm's ``w4a4-channel-static``, never with qvlm's ``w4a4``."""
    present = sorted({r.method_label for r in rows})
    for name in (a, b):
        if name not in present:
            raise HarnessError(f"method {name!r} has no results in the selected rows (methods there: "
                               f"{', '.join(present)}); run it first or pick another --run/--store")
    by_a = {(r.task, r.shots, computed_bits(r)): r for r in rows if r.method_label == a}
    by_b = {(r.task, r.shots, computed_bits(r)): r for r in rows if r.method_label == b}
    pairs = []
    for key in sorted(by_a.keys() & by_b.keys()):
        pairs.append((by_a[key], by_b[key]))
    for mine, other, flip in ((by_a, by_b, False), (by_b, by_a, True)):
        for (task, shots, bits), row in sorted(mine.items()):
            if bits != FLOAT_BITS or any(k[:2] == (task, shots) and k[2] != FLOAT_BITS for k in mine):
                continue  # only a method run at fp alone stands in for every bits of the other
            for (task2, shots2, bits2), row2 in sorted(other.items()):
                if (task2, shots2) == (task, shots) and bits2 != FLOAT_BITS:
                    pairs.append((row2, row) if flip else (row, row2))
    if not pairs:
        raise HarnessError(f"{a} and {b} share no task x bits in the selected rows (rows pair on bits and activation "
                           "quantizer, the table's Activations column); run both on the same tasks and bits, e.g. "
                           "--bits w4a4-token or w4a4-channel for both (a float method pairs with every bits)")
    return sorted(pairs, key=lambda p: (p[0].task, p[0].shots, p[0].bits, p[1].bits))


def _label(ra: ResultRow, rb: ResultRow) -> str:
    bits = ra.bits if ra.bits == rb.bits else f"{ra.bits}/{rb.bits}"
    return f"{ra.method_label} vs {rb.method_label} {bits} {ra.task}{f' {ra.shots}-shot' if ra.shots else ''}"


def check_same_samples(ra: ResultRow, rb: ResultRow) -> None:
    """Refuse (one line) a pair whose cells were not computed on the same samples, from the rows alone."""
    label = _label(ra, rb)
    if ra.sample_limit != rb.sample_limit:
        raise HarnessError(f"{label}: computed with different sample limits (--limit {ra.sample_limit} vs "
                           f"{rb.sample_limit}); rerun one with the other's --limit so both score the same samples")
    if ra.split != rb.split:
        raise HarnessError(f"{label}: computed on different splits ({ra.split} vs {rb.split}); rerun with one --split")
    if ra.data_fingerprint and rb.data_fingerprint and ra.data_fingerprint != rb.data_fingerprint:
        raise HarnessError(f"{label}: computed on different samples (data fingerprint {ra.data_fingerprint} vs "
                           f"{rb.data_fingerprint}: another --data-dir, --seed or data version); rerun both on the "
                           "same data")
    ta, tb = int(ra.settings.get("trials", 1) or 1), int(rb.settings.get("trials", 1) or 1)
    if ta != tb:
        raise HarnessError(f"{label}: {ta} vs {tb} few-shot trials; rerun with the same --trials")
    if ra.shots and ra.seed != rb.seed:
        raise HarnessError(f"{label}: few-shot demonstrations drawn with different seeds ({ra.seed} vs {rb.seed}); "
                           "rerun with the same --seed")


def _check_same_ids(label: str, ids_a: set[str], ids_b: set[str]) -> None:
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        example = f"e.g. {only_a[0]!r} only in A" if only_a else f"e.g. {only_b[0]!r} only in B"
        raise HarnessError(f"{label}: the two cells hold different samples ({len(ids_a)} vs {len(ids_b)}, {example}); "
                           "rerun both with the same --limit, --seed and --data-dir")


def _metrics(task: Task, ra: ResultRow, rb: ResultRow, wanted: str | Sequence[str]) -> list[str]:
    common = [m for m in interval_metrics(ra.metrics) if m in rb.metrics]
    if wanted == "primary":
        return [task.primary_metric] if task.primary_metric in common else common[:1]
    if wanted == "all":
        return common
    return [m for m in wanted if m in common]


def verdict(delta: ConfidenceInterval, lower_is_better: bool = False) -> str:
    """A relative to B: "better"/"worse" when the interval excludes 0 (sign by the metric's direction)."""
    if not (math.isfinite(delta.low) and math.isfinite(delta.high)):
        return "undefined"
    above, below = delta.low > 0, delta.high < 0
    if lower_is_better:
        above, below = below, above
    return "better" if above else "worse" if below else "not distinguishable"


def compare_methods(store: Store, method_a: str, method_b: str, *, run_id: str | None = None,
                    model: str | None = None, metrics: str | Sequence[str] = "primary", ci: float = 0.95,
                    n_resamples: int = 1000, seed: int = 0) -> MethodComparison:
    """Pair A's and B's newest cells (or those of one run) and compute A - B with its paired interval."""
    if not 0 < ci < 1:
        raise HarnessError(f"--ci must be in (0, 1), got {ci}")
    if n_resamples < 1:
        raise HarnessError("--resamples must be a positive number")
    a, b = _method_name(method_a), _method_name(method_b)
    if a == b:
        raise HarnessError(f"--methods needs two different methods, got {method_a},{method_b}")
    pairs = pair_rows(select_rows(store, run_id=run_id, model=model), a, b)
    for ra, rb in pairs:  # every refusal before any log is read or resampled
        check_same_samples(ra, rb)
    comp = MethodComparison(a, b, ci, n_resamples, seed)
    tasks: dict[str, Task] = {}
    for ra, rb in pairs:
        if ra.task not in tasks:
            tasks[ra.task] = plugins.tasks.get(ra.task)(**(ra.settings.get("task_options") or {}))
        task = tasks[ra.task]
        ca, cb = cell_from_row(ra, store.path), cell_from_row(rb, store.path)
        ids_a, ids_b = {str(e["id"]) for e in ca.entries}, {str(e["id"]) for e in cb.entries}
        _check_same_ids(_label(ra, rb), ids_a, ids_b)
        wanted = _metrics(task, ra, rb, metrics)
        if not wanted:
            comp.notes.append(f"{_label(ra, rb)}: none of the requested metrics ({metrics}) is in both rows")
            continue
        if ra.scoring != rb.scoring:
            comp.notes.append(f"{_label(ra, rb)}: scored differently ({ra.scoring} vs {rb.scoring})")
        deltas = paired_intervals(task, ca.entries, cb.entries, ca.trials, metrics=wanted, level=ci,
                                  n_boot=n_resamples, seed=seed)
        meta = task.metadata()
        for m in wanted:
            lower = m in meta.lower_is_better
            comp.results.append(PairedResult(
                task=ra.task, shots=ra.shots, bits_a=ra.bits, bits_b=rb.bits, metric=m, a=float(ra.metrics[m]),
                b=float(rb.metrics[m]), delta=deltas[m], n_paired=len(ids_a), trials=ca.trials,
                verdict=verdict(deltas[m], lower), lower_is_better=lower, activations_a=row_activations(ra),
                activations_b=row_activations(rb)))
    if not comp.results:
        raise HarnessError(f"none of the metrics {metrics} is reported by both {a} and {b}; use --metrics primary, "
                           "all, or names from `harness ls tasks`")
    return comp


# -- output ----------------------------------------------------------------------------------------------------------
def _fmt(x: float, spec: str = ".2f") -> str:
    return format(x, spec) if math.isfinite(x) else "-"


def format_method_comparison(comp: MethodComparison) -> str:
    """A Markdown table (one line per task x bits x metric) and a one-line summary."""
    from tabulate import tabulate

    a, b = comp.method_a, comp.method_b
    pct = f"{round(100 * comp.ci)}% CI"
    rows = []
    for r in comp.results:
        word = {"better": f"{a} better", "worse": f"{a} worse"}.get(r.verdict, r.verdict)
        rows.append([r.task_label, r.bits_label, r.activations_label, r.metric + ("*" if r.lower_is_better else ""),
                     _fmt(r.a), _fmt(r.b), _fmt(r.delta.estimate, "+.2f"),
                     f"[{_fmt(r.delta.low, '+.2f')}, {_fmt(r.delta.high, '+.2f')}]", r.n_paired, word])
    head = ["Task", "Bits", "Activations", "Metric", a, b, f"{a} - {b}", pct, "N", "Verdict"]
    out = [tabulate(rows, headers=head, tablefmt="github", disable_numparse=True)]
    if any(r.lower_is_better for r in comp.results):
        out.append("* lower is better")
    out += [f"note: {n}" for n in comp.notes]
    counts = {v: sum(r.verdict == v for r in comp.results) for v in ("better", "worse", "not distinguishable")}
    out.append(f"\n{a} vs {b}: significantly better in {counts['better']}, worse in {counts['worse']}, not "
               f"distinguishable in {counts['not distinguishable']} of {len(comp.results)} comparisons "
               f"(paired bootstrap, {comp.n_resamples} resamples, seed {comp.seed})")
    return "\n".join(out)


def method_comparison_to_dict(comp: MethodComparison) -> dict[str, Any]:
    return {"method_a": comp.method_a, "method_b": comp.method_b, "ci": comp.ci, "resamples": comp.n_resamples,
            "seed": comp.seed, "notes": comp.notes, "comparisons": [
                {"task": r.task, "shots": r.shots, "bits_a": r.bits_a, "bits_b": r.bits_b,
                 "activations_a": r.activations_a, "activations_b": r.activations_b, "metric": r.metric,
                 "a": r.a, "b": r.b, "delta": r.delta.estimate, "low": r.delta.low, "high": r.delta.high,
                 "n_paired": r.n_paired, "trials": r.trials, "verdict": r.verdict} for r in comp.results]}
