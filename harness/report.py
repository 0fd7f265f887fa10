"""Tables from result rows: CSV, LaTeX (booktabs) and Markdown, with columns as in the paper's tables.

Two kinds of table:
- the main table: method x bits, each task's primary metric, latency and memory, and the execution label
  ("float", "simulated", "real") so fake quantization is never mistaken for a measured deployment;
- one table per task with every sub-metric (ScienceQA: NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from qvlm_harness.config import QuantSpec
from qvlm_harness.store import ResultRow

TASK_LABELS = {"sqa": "ScienceQA", "vqav2": "VQAv2", "vizwiz": "VizWiz", "hm": "HM"}
METRIC_LABELS = {"parse_fail": "Parse fail %", "auroc": "AUROC", "unans_precision": "Unans P",
                 "unans_recall": "Unans R"}
# Sub-metric order per task (paper order for ScienceQA).
TASK_COLUMNS = {
    "sqa": ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "acc", "parse_fail"],
    "vqav2": ["acc", "yes/no", "number", "other"],
    "vizwiz": ["acc", "yes/no", "number", "other", "unanswerable", "unans_precision", "unans_recall"],
    "hm": ["auroc", "acc"],
}
SIMULATED_NOTE = ("simulated = fake quantization in floating point: accuracy is real, latency and memory are those "
                  "of the float model (packed MB is what a packed format would take).")


def _method_sort_key(row: ResultRow) -> tuple:
    """FP baselines first, then higher precision before lower, methods in a stable order."""
    order = {"fp32": 0, "bf16": 1, "fp16": 2}
    if row.bits == "fp":
        return (0, 0, 0, order.get(row.method, 10), row.method, row.shots)
    spec = QuantSpec.parse(row.bits)
    return (1, -spec.w_bits, -spec.a_bits, 10, row.method, row.shots)


def _metric_label(task: str, key: str) -> str:
    if key == "acc":
        return "Avg" if task == "sqa" else "Acc"
    return METRIC_LABELS.get(key, key)


def _method_label(row: ResultRow) -> str:
    control = row.settings.get("image_control")
    return f"{row.method} [{control} images]" if control else row.method


def _shot_label(row: ResultRow) -> str:
    return f"{TASK_LABELS.get(row.task, row.task)}{f' {row.shots}-shot' if row.shots else ''}"


def main_table(rows: Sequence[ResultRow], primary: dict[str, str] | None = None) -> pd.DataFrame:
    """Method x bits with each task's primary metric, latency and memory."""
    primary = primary or {}
    groups: dict[tuple[str, str], list[ResultRow]] = {}
    for r in sorted(rows, key=_method_sort_key):
        groups.setdefault((_method_label(r), r.bits), []).append(r)
    records = []
    for (method, bits), rs in groups.items():
        rec = {"Method": method, "Bits": "FP" if bits == "fp" else bits.upper(), "Exec": rs[0].execution}
        for r in rs:
            metric = primary.get(r.task) or primary_metric(r.task, r)
            rec[_shot_label(r)] = r.metrics.get(metric, math.nan)
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
        records.append(rec)
    return pd.DataFrame.from_records(records)


def task_table(rows: Sequence[ResultRow], task: str) -> pd.DataFrame:
    """Every sub-metric of one task, method x bits (x shots)."""
    cols = TASK_COLUMNS.get(task)
    records = []
    for r in sorted((r for r in rows if r.task == task), key=_method_sort_key):
        rec = {"Method": _method_label(r), "Bits": "FP" if r.bits == "fp" else r.bits.upper(), "Exec": r.execution}
        if r.shots or task == "hm":
            rec["Shots"] = r.shots
        keys = cols or [k for k in r.metrics if not k.startswith("n_")]
        for k in keys:
            rec[_metric_label(task, k)] = r.metrics.get(k, math.nan)
            if f"{k}_std" in r.metrics:
                rec[f"{_metric_label(task, k)} ±"] = r.metrics[f"{k}_std"]
        rec["N"] = r.n_samples
        records.append(rec)
    return pd.DataFrame.from_records(records)


def to_markdown(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt, missingval="-")


def best_cells(df: pd.DataFrame, higher: Sequence[str] = (), lower: Sequence[str] = (),
               eligible: pd.Series | None = None) -> set[tuple[int, str]]:
    """(row position, column) of the best value per column: max for `higher`, min for `lower`, among the
    `eligible` rows (e.g. latency only among rows measured on real kernels); ties are all best."""
    out: set[tuple[int, str]] = set()
    mask = pd.Series(True, index=df.index) if eligible is None else eligible.reindex(df.index).fillna(False)
    for cols, pick in ((higher, "max"), (lower, "min")):
        for col in cols:
            if col not in df.columns or not pd.api.types.is_numeric_dtype(df[col]):
                continue
            values = df[col][mask.astype(bool)].dropna()
            if values.empty:
                continue
            best = getattr(values, pick)()
            out |= {(df.index.get_loc(i), col) for i in values.index[values == best]}
    return out


def to_latex(df: pd.DataFrame, caption: str = "", bold_best: Sequence[str] = (), bold_min: Sequence[str] = (),
             eligible: pd.Series | None = None, bold: set[tuple[int, str]] | None = None) -> str:
    """booktabs LaTeX; the best value of each column is set in bold: the largest in `bold_best`, the smallest in
    `bold_min` (among `eligible` rows when given), or exactly the cells in `bold`."""
    body = df.copy()
    bold = best_cells(df, bold_best, bold_min, eligible) if bold is None else bold
    for col in body.columns:
        if pd.api.types.is_float_dtype(body[col]):
            body[col] = [("-" if (v is None or (isinstance(v, float) and math.isnan(v))) else
                          (f"\\textbf{{{v:.2f}}}" if (i, col) in bold else f"{v:.2f}"))
                         for i, v in enumerate(body[col])]
        else:
            body[col] = [_latex_escape(str(v)) for v in body[col]]
    header = " & ".join(_latex_escape(str(c)) for c in body.columns) + r" \\"
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{'l' * 3 + 'r' * (len(body.columns) - 3)}}}",
             r"\toprule", header, r"\midrule"]
    lines += [" & ".join(map(str, row)) + r" \\" for row in body.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{_latex_escape(caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$")):
        text = text.replace(a, b)
    return text


def write_tables(rows: Sequence[ResultRow], folder: Path, *, caveat: str | None = None) -> dict[str, Path]:
    """Write main and per-task tables as CSV, LaTeX and Markdown; returns {name: markdown path}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    tables = {"main": main_table(rows)}
    for task in dict.fromkeys(r.task for r in rows):
        tables[task] = task_table(rows, task)
    notes = SIMULATED_NOTE + (f" {caveat}" if caveat else "")
    for name, df in tables.items():
        metric_cols = [c for c in df.columns if c not in ("Method", "Bits", "Exec", "Shots", "N", "Prefill ms",
                                                          "Weights MB", "Packed MB", "Peak RSS MB", "Search s",
                                                          "Parse fail %") and not c.endswith("±")]
        df.to_csv(folder / f"{name}.csv", index=False)
        (folder / f"{name}.tex").write_text(to_latex(df, caption=notes, bold_best=metric_cols))
        (folder / f"{name}.md").write_text(to_markdown(df) + f"\n\n{notes}\n")
        written[name] = folder / f"{name}.md"
    return written


# -- the paper's tables ----------------------------------------------------------------------------------------------
TASK_ORDER = ("sqa", "vqav2", "vizwiz", "hm")
EFFICIENCY_COLUMNS = ("Prefill ms", "Decode tok/s", "Weights MB", "Packed MB", "Peak RSS MB", "Search s")
MEASURED_ON_REAL_KERNELS = ("Prefill ms", "Decode tok/s", "Weights MB", "Peak RSS MB")


def primary_metric(task: str, row: ResultRow | None = None) -> str:
    """The metric a table shows for a task: the one a row recorded (lm-eval tasks name theirs, e.g. `acc,none`),
    else the native default."""
    if row is not None and row.settings.get("primary_metric"):
        return str(row.settings["primary_metric"])
    return "auroc" if task == "hm" else "acc"


def _bits_label(bits: str) -> str:
    return "FP" if bits == "fp" else bits.upper()


def _task_sort_key(task: str, shots: int) -> tuple:
    return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task, shots)


def dedupe(rows: Sequence[ResultRow]) -> list[ResultRow]:
    """One row per (model, method, bits, task, shots): the newest, so a store with reruns renders cleanly."""
    newest: dict[tuple, ResultRow] = {}
    for r in sorted(rows, key=lambda r: r.created):
        newest[(r.model, r.method, r.bits, r.task, r.shots)] = r
    return list(newest.values())


def multi_dataset_table(rows: Sequence[ResultRow]) -> pd.DataFrame:
    """The multi-dataset table: method x bits, one column per task (and shot count) with its primary metric."""
    columns = sorted({(r.task, r.shots) for r in rows}, key=lambda k: _task_sort_key(*k))
    groups: dict[tuple[str, str], list[ResultRow]] = {}
    for r in sorted(rows, key=_method_sort_key):
        groups.setdefault((r.method, r.bits), []).append(r)
    records = []
    for (method, bits), rs in groups.items():
        rec: dict = {"Method": method, "Bits": _bits_label(bits), "Exec": rs[0].execution}
        by_col = {(r.task, r.shots): r for r in rs}
        for task, shots in columns:
            r = by_col.get((task, shots))
            label = f"{TASK_LABELS.get(task, task)}{f' {shots}-shot' if shots else ''}"
            rec[label] = r.metrics.get(primary_metric(task, r), math.nan) if r else math.nan
        records.append(rec)
    return pd.DataFrame.from_records(records)


def efficiency_table(rows: Sequence[ResultRow]) -> pd.DataFrame:
    """Latency and memory per method x bits (averaged over the cells of that setting), with the execution label:
    for "simulated" rows the timings and stored bytes are those of the float model."""
    table = main_table(rows)
    keep = ["Method", "Bits", "Exec", *EFFICIENCY_COLUMNS]
    return table[[c for c in keep if c in table.columns]]


def paper_tables(rows: Sequence[ResultRow]) -> dict[str, pd.DataFrame]:
    """name -> table: "sqa" (ScienceQA categories, when present), "datasets", "efficiency"."""
    out = {}
    if any(r.task == "sqa" for r in rows):
        out["sqa"] = task_table(rows, "sqa")
    out["datasets"] = multi_dataset_table(rows)
    out["efficiency"] = efficiency_table(rows)
    return out


def bold_cells(name: str, df: pd.DataFrame) -> set[tuple[int, str]]:
    """The best cell of each column of a paper table. Accuracy columns: the largest. Efficiency: the fastest and
    smallest, where timings and stored bytes count only for rows not "simulated" (those carry the float model's
    figures), while the packed size counts for every row."""
    if name == "efficiency":
        real = df["Exec"] != "simulated"
        return (best_cells(df, ["Decode tok/s"], ["Prefill ms", "Weights MB", "Peak RSS MB"], real)
                | best_cells(df, lower=["Packed MB"]))
    skip = {"Method", "Bits", "Exec", "Shots", "N", "Parse fail %"}
    return best_cells(df, [c for c in df.columns if c not in skip and not c.endswith("±")])


def table_to_latex(name: str, df: pd.DataFrame, caption: str = "") -> str:
    return to_latex(df, caption=caption, bold=bold_cells(name, df))


PAPER_CAPTIONS = {
    "sqa": "ScienceQA accuracy (%) by category: natural science, social science, language science, text context, "
           "image context, no context, grades 1-6 and 7-12, and the average.",
    "datasets": "Primary metric per dataset: accuracy (%) for ScienceQA, VQAv2 and VizWiz, ROC AUC (%) for "
                "Hateful Memes.",
    "efficiency": "Latency (prefill ms per sample, decode tokens/s), weight memory (MB as stored and packed), peak "
                  "RSS and quantization search time.",
}


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
            paths["tex"].write_text(table_to_latex(name, df, caption=f"{PAPER_CAPTIONS[name]} {notes}"))
        if "md" in formats:
            paths["md"] = folder / f"{name}.md"
            paths["md"].write_text(to_markdown(df) + f"\n\n{notes}\n")
        written[name] = paths
    return written
