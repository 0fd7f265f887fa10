"""Tables from result rows: CSV, LaTeX (booktabs) and Markdown, with columns as in the paper's tables.

Two kinds of table:
- the main table: method x bits, each task's primary metric, latency and memory, the activation quantizer
  ("Activations": token-dyn, tensor-static, channel-static, ...; `qvlm_harness.activations`), so two rows at one
  bit-width with different activation quantizers are never read as a like-for-like comparison, and the execution
  label ("float", "simulated", "real") so fake quantization is never mistaken for a measured deployment;
- one table per task with every sub-metric, in the order and under the labels the task declares.

This module knows no task: labels, metric order, primary metrics, which end of a column is best, the Shots column
and captions all come from the `TaskMeta` stored with each row (`qvlm_harness.task.row_task_meta`), so a
third-party task renders as well as a built-in one.

A table is a DataFrame of values; its `attrs` carry what the renderers need beyond them:
- "ranking": {column: "max" | "min"}, the columns whose best value is set in bold;
- "measured_only": columns whose best is chosen among rows not "simulated" (their timings are the float model's);
- "intervals": {value column: half-width column} for metrics stored with a confidence interval
  (`<metric>_ci_lo` / `<metric>_ci_hi`): CSV keeps both numeric columns, Markdown, LaTeX and HTML fold the
  half-width into the value's cell ("68.00 ±3.70"), which keeps wide breakdown tables readable;
- "title", "caption": for the HTML heading and the LaTeX caption.
Rendering them is `qvlm_harness.table_format`'s job (`to_markdown`, `to_latex`, `best_cells` are re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from qvlm_harness.activations import row_activations
from qvlm_harness.config import QuantSpec
from qvlm_harness.store import ResultRow
from qvlm_harness.table_format import best_cells, table_notes, table_to_latex, to_latex, to_markdown  # noqa: F401
from qvlm_harness.task import TaskMeta, row_task_meta

ACTIVATIONS_COLUMN = "Activations"
SIMULATED_NOTE = ("simulated = fake quantization in floating point: accuracy is real, latency and memory are those "
                  "of the float model (packed MB is what a packed format would take).")
EFFICIENCY_COLUMNS = ("Prefill ms", "Decode tok/s", "Weights MB", "Packed MB", "Peak RSS MB", "Search s")
MEASURED_ON_REAL_KERNELS = ("Prefill ms", "Decode tok/s", "Weights MB", "Peak RSS MB")
EFFICIENCY_RANKING = {"Prefill ms": "min", "Decode tok/s": "max", "Weights MB": "min", "Packed MB": "min",
                      "Peak RSS MB": "min"}
EFFICIENCY_CAPTION = ("Latency (prefill ms per sample, decode tokens/s), weight memory (MB as stored and packed), "
                      "peak RSS and quantization search time.")


# -- task metadata of a set of rows ----------------------------------------------------------------------------------
def task_order(rows: Sequence[ResultRow]) -> list[str]:
    """Tasks in the order they first appear in the rows (the run's task order for a run's rows)."""
    return list(dict.fromkeys(r.task for r in rows))


def task_meta(rows: Sequence[ResultRow], task: str) -> TaskMeta:
    """One task's metadata: the first of its rows that stored one; for rows stored before tasks declared it, the
    fallback over all its rows (every metric any of them recorded)."""
    own = [r for r in rows if r.task == task]
    stored = next((r for r in own if r.settings.get("task_meta")), None)
    if stored is not None:
        return row_task_meta(stored)
    if not own:
        return TaskMeta(label=task, metrics=(), primary="")
    fallbacks = [row_task_meta(r) for r in own]
    metrics = tuple(dict.fromkeys(m for f in fallbacks for m in f.metrics))
    recorded = next((f.primary for r, f in zip(own, fallbacks, strict=True) if r.settings.get("primary_metric")),
                    fallbacks[0].primary)
    return TaskMeta(label=task, metrics=metrics, primary=recorded)


def task_metas(rows: Sequence[ResultRow]) -> dict[str, TaskMeta]:
    """{task: metadata}, in task order."""
    return {task: task_meta(rows, task) for task in task_order(rows)}


def task_labels(metas: Mapping[str, TaskMeta]) -> dict[str, str]:
    """{task: column label}; two tasks declaring the same label are told apart by their names."""
    counts: dict[str, int] = {}
    for meta in metas.values():
        counts[meta.label] = counts.get(meta.label, 0) + 1
    return {task: meta.label if counts[meta.label] == 1 else f"{meta.label} ({task})" for task, meta in metas.items()}


def task_shots_order(rows: Sequence[ResultRow]) -> list[tuple[str, int]]:
    """The (task, shots) cells of the rows: tasks in first-appearance order, shots ascending."""
    order = {task: i for i, task in enumerate(task_order(rows))}
    return sorted({(r.task, r.shots) for r in rows}, key=lambda k: (order[k[0]], k[1]))


def _shots_label(label: str, shots: int) -> str:
    return f"{label}{f' {shots}-shot' if shots else ''}"


# -- building tables -------------------------------------------------------------------------------------------------
def _method_sort_key(row: ResultRow) -> tuple:
    """FP baselines first (the widest first: fp32 before bf16/fp16, by the bytes their weights take), then higher
    precision before lower, methods in a stable order."""
    if row.bits == "fp":
        return (0, 0, 0, -float(row.measurements.get("weight_mb_stored") or 0.0), row.method, row.shots)
    spec = QuantSpec.parse(row.bits)
    return (1, -spec.w_bits, -spec.a_bits, 0.0, row.method, row.shots)


# settings that make two rows of one (method, bits, task, shots) different cells, and how a label shows them
_VARIANT_SETTINGS: tuple[tuple[str, str], ...] = (
    ("limit", "limit"), ("seed", "seed"), ("scoring", "scoring"), ("options", ""), ("calib_samples", "calib"),
    ("calib_task", "calib on"), ("execution", ""), ("batch_size", "batch"), ("data", "data"), ("dtype", "dtype"),
)


def _variant_values(row: ResultRow) -> dict[str, str]:
    s, ident = row.settings or {}, row.identity or {}
    options = s.get("options") or {}
    return {
        "limit": str(row.sample_limit), "seed": str(row.seed), "scoring": str(row.scoring),
        "options": " ".join(f"{k}={v}" for k, v in sorted(options.items())),
        "calib_samples": str(s.get("calib_samples")), "calib_task": str(s.get("calib_task")),
        "execution": row.execution, "batch_size": str(s.get("batch_size")), "data": str(ident.get("data")),
        "dtype": str(ident.get("dtype")),
    }


def variant_labels(rows: Sequence[ResultRow]) -> dict[str, str]:
    """cell id -> the settings that tell it apart from the other rows of its (model, method, bits, task, shots),
    e.g. "limit=100 seed=1" (empty where the row is alone): `report --all` shows distinct cells side by side."""
    groups: dict[tuple, list[ResultRow]] = {}
    for r in rows:
        groups.setdefault((r.model, r.method, r.bits, r.task, r.shots, r.settings.get("image_control")), []).append(r)
    out: dict[str, str] = {}
    for group in groups.values():
        values = [_variant_values(r) for r in group]
        differing = [k for k, _ in _VARIANT_SETTINGS if len({v[k] for v in values}) > 1]
        for r, v in zip(group, values, strict=True):
            parts = [f"{label}={v[k]}" if label else v[k] for k, label in _VARIANT_SETTINGS if k in differing]
            out[r.cell_id] = " ".join(p for p in parts if p)
    return out


def method_name(row: ResultRow) -> str:
    """The row's method, with the rotation it quantized after (e.g. rtn+hadamard; `harness run --rotate`)."""
    return row.method_label


def _method_label(row: ResultRow, variants: Mapping[str, str] | None = None) -> str:
    control = row.settings.get("image_control")
    method = method_name(row)
    label = f"{method} [{control} images]" if control else method
    variant = (variants or {}).get(row.cell_id)
    return f"{label} ({variant})" if variant else label


def _bits_label(bits: str) -> str:
    return "FP" if bits == "fp" else bits.upper()


def interval_half_width(metrics: Mapping[str, float], metric: str) -> float | None:
    """Half the width of a metric's stored confidence interval, None when the row has none (or an undefined one,
    e.g. NaN bounds from a resample without both classes)."""
    lo, hi = metrics.get(f"{metric}_ci_lo"), metrics.get(f"{metric}_ci_hi")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return (float(hi) - float(lo)) / 2


def _put_value(rec: dict, column: str, metrics: Mapping[str, float], metric: str, intervals: dict[str, str]) -> None:
    """A metric's value into `column`, and its interval's half-width into a column of its own when it has one."""
    rec[column] = metrics.get(metric, math.nan)
    half = interval_half_width(metrics, metric)
    if half is not None:
        intervals[column] = f"{column} CI ±"
        rec[intervals[column]] = half


def _frame(records: list[dict], *, ranking: Mapping[str, str], intervals: Mapping[str, str],
           measured_only: Sequence[str] = (), title: str = "", caption: str = "") -> pd.DataFrame:
    """The table with each half-width column right after its value column, and the renderers' attrs."""
    df = pd.DataFrame.from_records(records)
    if intervals:
        halves = set(intervals.values())
        order = []
        for col in (c for c in df.columns if c not in halves):
            order.append(col)
            if col in intervals and intervals[col] in df.columns:
                order.append(intervals[col])
        df = df[order]
    return _annotate(df, ranking=ranking, intervals=intervals, measured_only=measured_only, title=title,
                     caption=caption)


def _annotate(df: pd.DataFrame, *, ranking: Mapping[str, str], intervals: Mapping[str, str],
              measured_only: Sequence[str] = (), title: str = "", caption: str = "") -> pd.DataFrame:
    """Set the attrs the renderers read (see the module docstring), keeping only columns the table has."""
    df.attrs.update(ranking={c: v for c, v in ranking.items() if c in df.columns},
                    intervals={c: h for c, h in intervals.items() if c in df.columns and h in df.columns},
                    measured_only=[c for c in measured_only if c in df.columns], title=title, caption=caption)
    return df


def main_table(rows: Sequence[ResultRow], primary: dict[str, str] | None = None) -> pd.DataFrame:
    """Method x bits with each task's primary metric (or `primary[task]`), latency and memory. A column holds one
    metric: the task's (see `task_meta`), also when its rows disagree."""
    primary = primary or {}
    metas = task_metas(rows)
    labels = task_labels(metas)
    variants = variant_labels(rows)
    groups: dict[tuple[str, str], list[ResultRow]] = {}
    for r in sorted(rows, key=_method_sort_key):
        groups.setdefault((_method_label(r, variants), r.bits), []).append(r)
    columns = {cell: _shots_label(labels[cell[0]], cell[1]) for cell in task_shots_order(rows)}
    records, ranking, intervals = [], {}, {}
    for (method, bits), rs in groups.items():
        rec = {"Method": method, "Bits": _bits_label(bits), ACTIVATIONS_COLUMN: row_activations(rs[0]),
               "Exec": rs[0].execution}
        rec |= {column: math.nan for column in columns.values()}  # task columns in task order
        for r in rs:
            meta = metas[r.task]
            metric = primary.get(r.task) or meta.primary
            column = columns[(r.task, r.shots)]
            _put_value(rec, column, r.metrics, metric, intervals)
            if meta.is_ranked(metric):
                ranking[column] = meta.best(metric)
        prefill = [r.measurements.get("prefill_ms_per_sample") for r in rs]
        prefill = [p for p in prefill if p is not None]
        decode = [r.measurements.get("decode_tokens_per_s") for r in rs]
        decode = [d for d in decode if d is not None]
        rec["Prefill ms"] = sum(prefill) / len(prefill) if prefill else math.nan
        rec["Decode tok/s"] = sum(decode) / len(decode) if decode else math.nan
        rec["Weights MB"] = rs[0].measurements.get("weight_mb_stored", math.nan)
        rec["Packed MB"] = rs[0].measurements.get("weight_mb_packed", math.nan)
        rec["Peak RSS MB"] = max(r.measurements.get("peak_rss_mb", 0.0) for r in rs)
        rec["Search s"] = rs[0].search_cost.get("seconds", 0.0)
        fidelity = [r.measurements.get("fidelity") for r in rs if r.measurements.get("fidelity")]
        if fidelity:  # how far the model is from FP on prompts it was not calibrated on
            rec["KL to FP"] = sum(f["kl_mean"] for f in fidelity) / len(fidelity)
            rec["Top-1 %"] = sum(f["top1_agree"] for f in fidelity) / len(fidelity)
        records.append(rec)
    return _frame(records, ranking=ranking | EFFICIENCY_RANKING, intervals=intervals,
                  measured_only=MEASURED_ON_REAL_KERNELS, title="Results")


def task_table(rows: Sequence[ResultRow], task: str) -> pd.DataFrame:
    """Every sub-metric of one task, method x bits (x shots), in the task's declared order and labels."""
    own = sorted((r for r in rows if r.task == task), key=_method_sort_key)
    variants = variant_labels(own)
    meta = task_meta(own, task)
    records, intervals = [], {}
    for r in own:
        rec = {"Method": _method_label(r, variants), "Bits": _bits_label(r.bits),
               ACTIVATIONS_COLUMN: row_activations(r), "Exec": r.execution}
        if r.shots or meta.varies_by_shots:
            rec["Shots"] = r.shots
        for k in meta.metrics:
            label = meta.metric_label(k)
            _put_value(rec, label, r.metrics, k, intervals)
            if f"{k}_std" in r.metrics:
                rec[f"{label} ±"] = r.metrics[f"{k}_std"]
        rec["N"] = r.n_samples
        records.append(rec)
    ranking = {meta.metric_label(k): meta.best(k) for k in meta.metrics if meta.is_ranked(k)}
    return _frame(records, ranking=ranking, intervals=intervals, title=meta.display_table_title,
                  caption=meta.caption)


def dedupe(rows: Sequence[ResultRow]) -> list[ResultRow]:
    """One row per cell id (the newest). Rows of one (method, bits, task) that differ in what they were computed
    with (limit, seed, scoring, options, data...) are distinct cells and all kept; `variant_labels` tells them
    apart in the tables."""
    newest: dict[str, ResultRow] = {}
    for r in sorted(rows, key=lambda r: r.created):
        newest[r.cell_id] = r
    return list(newest.values())


def and_join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def datasets_caption(metas: Mapping[str, TaskMeta]) -> str:
    """"Primary metric per dataset: accuracy (%) for A and B, ROC AUC (%) for C.", from the tasks' metadata."""
    groups: dict[str, list[str]] = {}
    for meta in metas.values():
        titles = groups.setdefault(meta.axis_label(meta.primary), [])
        if meta.display_title not in titles:
            titles.append(meta.display_title)
    if not groups:
        return "Primary metric per dataset."
    return f"Primary metric per dataset: {', '.join(f'{what} for {and_join(t)}' for what, t in groups.items())}."


def multi_dataset_table(rows: Sequence[ResultRow]) -> pd.DataFrame:
    """The multi-dataset table: method x bits, one column per task (and shot count) with its primary metric."""
    metas = task_metas(rows)
    labels = task_labels(metas)
    columns = task_shots_order(rows)
    groups: dict[tuple[str, str], list[ResultRow]] = {}
    for r in sorted(rows, key=_method_sort_key):
        groups.setdefault((method_name(r), r.bits), []).append(r)
    records, intervals = [], {}
    for (method, bits), rs in groups.items():
        rec: dict = {"Method": method, "Bits": _bits_label(bits), ACTIVATIONS_COLUMN: row_activations(rs[0]),
                     "Exec": rs[0].execution}
        by_col = {(r.task, r.shots): r for r in rs}
        for task, shots in columns:
            r = by_col.get((task, shots))
            label = _shots_label(labels[task], shots)
            if r is None:
                rec[label] = math.nan
            else:
                _put_value(rec, label, r.metrics, metas[task].primary, intervals)
        records.append(rec)
    ranking = {_shots_label(labels[t], s): metas[t].best(metas[t].primary) for t, s in columns
               if metas[t].is_ranked(metas[t].primary)}
    return _frame(records, ranking=ranking, intervals=intervals, title="Results per dataset",
                  caption=datasets_caption(metas))


def efficiency_table(rows: Sequence[ResultRow]) -> pd.DataFrame:
    """Latency and memory per method x bits (averaged over the cells of that setting), with the execution label:
    for "simulated" rows the timings and stored bytes are those of the float model."""
    keep = ["Method", "Bits", ACTIVATIONS_COLUMN, "Exec", *EFFICIENCY_COLUMNS]
    table = main_table(rows)
    return _annotate(table[[c for c in keep if c in table.columns]].copy(), ranking=EFFICIENCY_RANKING,
                     intervals={}, measured_only=MEASURED_ON_REAL_KERNELS, title="Latency and memory",
                     caption=EFFICIENCY_CAPTION)


def paper_tables(rows: Sequence[ResultRow]) -> dict[str, pd.DataFrame]:
    """name -> table: the breakdown of each task that declares it one of the paper's tables (named after the task),
    then "datasets" and "efficiency"."""
    out = {task: task_table(rows, task) for task, meta in task_metas(rows).items() if meta.paper_table}
    out["datasets"] = multi_dataset_table(rows)
    out["efficiency"] = efficiency_table(rows)
    return out


def write_tables(rows: Sequence[ResultRow], folder: Path, *, caveat: str | None = None) -> dict[str, Path]:
    """Write main and per-task tables as CSV, LaTeX and Markdown; returns {name: markdown path}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    tables = {"main": main_table(rows)} | {task: task_table(rows, task) for task in task_order(rows)}
    notes = SIMULATED_NOTE + (f" {caveat}" if caveat else "")
    for name, df in tables.items():
        df.to_csv(folder / f"{name}.csv", index=False)
        (folder / f"{name}.tex").write_text(table_to_latex(df, notes))
        (folder / f"{name}.md").write_text(to_markdown(df) + f"\n\n{table_notes(df, notes)}\n")
        written[name] = folder / f"{name}.md"
    return written


def write_paper_tables(rows: Sequence[ResultRow], folder: Path, *, formats: Sequence[str] = ("csv", "tex", "md"),
                       caveat: str | None = None) -> dict[str, dict[str, Path]]:
    """Write the paper's tables in each format; returns {table: {format: path}}."""
    folder.mkdir(parents=True, exist_ok=True)
    notes = SIMULATED_NOTE + (f" {caveat}" if caveat else "")
    written: dict[str, dict[str, Path]] = {}
    for name, df in paper_tables(rows).items():
        paths = {}
        if "csv" in formats:
            df.to_csv(paths.setdefault("csv", folder / f"{name}.csv"), index=False)
        if "tex" in formats:
            paths["tex"] = folder / f"{name}.tex"
            paths["tex"].write_text(table_to_latex(df, notes))
        if "md" in formats:
            paths["md"] = folder / f"{name}.md"
            paths["md"].write_text(to_markdown(df) + f"\n\n{table_notes(df, notes)}\n")
        written[name] = paths
    return written
