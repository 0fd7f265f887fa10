"""Rendering tables (DataFrames built by `qvlm_harness.report`) as Markdown, booktabs LaTeX or HTML cells: the best
cell of each ranked column in bold, and confidence intervals folded into their value's cell.

What a table asks for travels in its `attrs` (see `qvlm_harness.report`): "ranking" ({column: "max" | "min"}),
"measured_only" (columns whose best counts only rows not "simulated") and "intervals" ({value column: half-width
column}). A DataFrame without them renders as a plain table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

INTERVAL_NOTE = "Values read x ±h: h is half the width of the value's confidence interval."


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


STRUCTURAL_COLUMNS = ("Method", "Bits", "Activations", "Exec", "Shots", "N")


def bold_cells(df: pd.DataFrame) -> set[tuple[int, str]]:
    """The best cell of each ranked column, by the table's "ranking" (see the module docstring): accuracy columns
    at their maximum, lower-is-better metrics, latency and memory at their minimum, where "measured_only" columns
    count only rows not "simulated". A table built elsewhere (no ranking) ranks its numeric value columns by max."""
    ranking = df.attrs.get("ranking")
    if ranking is None:
        halves = set(df.attrs.get("intervals", {}).values())
        ranking = {c: "max" for c in df.columns
                   if c not in STRUCTURAL_COLUMNS and c not in halves and not str(c).endswith("±")}
    measured = set(df.attrs.get("measured_only", ()))
    real = df["Exec"] != "simulated" if "Exec" in df.columns else None
    out: set[tuple[int, str]] = set()
    for col, pick in ranking.items():
        higher, lower = ([col], []) if pick == "max" else ([], [col])
        out |= best_cells(df, higher, lower, real if col in measured else None)
    return out


# -- rendering -------------------------------------------------------------------------------------------------------
def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def has_intervals(df: pd.DataFrame) -> bool:
    """Whether any cell of the table carries a confidence interval (and renders as "value ±half")."""
    return any(df[h].notna().any() for h in df.attrs.get("intervals", {}).values() if h in df.columns)


def folded_cells(df: pd.DataFrame, column: str, fmt: str, pm: str = " ±",
                 bold=lambda i, text: text) -> list[str]:
    """A value column with its interval's half-width folded in: "68.00 ±3.70", "68.00" without one, "-" missing.
    `bold(i, text)` marks the value of row i (the half-width is never bold)."""
    half_col = df.attrs["intervals"][column]
    out = []
    for i, (v, h) in enumerate(zip(df[column], df[half_col], strict=True)):
        if _is_missing(v):
            out.append("-")
            continue
        text = bold(i, format(v, fmt))
        out.append(text if _is_missing(h) else f"{text}{pm}{format(h, fmt)}")
    return out


def _folded(df: pd.DataFrame, fmt: str, pm: str = " ±", bold=lambda i, c, text: text) -> pd.DataFrame:
    """The table as shown: interval half-widths folded into their value cells, their own columns dropped."""
    intervals = df.attrs.get("intervals", {})
    body = df.drop(columns=list(intervals.values()))
    for col in intervals:
        body[col] = folded_cells(df, col, fmt, pm, bold=lambda i, text, col=col: bold(i, col, text))
    return body


def to_markdown(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    if not has_intervals(df):
        return df.to_markdown(index=False, floatfmt=floatfmt, missingval="-")
    body = _folded(df, floatfmt)
    align = ["right" if c in df.attrs["intervals"] or pd.api.types.is_numeric_dtype(body[c]) else "left"
             for c in body.columns]
    return body.to_markdown(index=False, floatfmt=floatfmt, missingval="-", colalign=align)


def to_latex(df: pd.DataFrame, caption: str = "", bold_best: Sequence[str] = (), bold_min: Sequence[str] = (),
             eligible: pd.Series | None = None, bold: set[tuple[int, str]] | None = None) -> str:
    """booktabs LaTeX; the best value of each column is set in bold: the largest in `bold_best`, the smallest in
    `bold_min` (among `eligible` rows when given), or exactly the cells in `bold`. Values with an interval read
    `68.00$\\pm$3.70`."""
    bold = best_cells(df, bold_best, bold_min, eligible) if bold is None else bold

    def number(i: int, col: str, v: float) -> str:
        return f"\\textbf{{{v:.2f}}}" if (i, col) in bold else f"{v:.2f}"

    intervals = df.attrs.get("intervals", {}) if has_intervals(df) else {}
    body = df.drop(columns=list(intervals.values())) if intervals else df.copy()
    for col in body.columns:
        if col in intervals:
            body[col] = folded_cells(df, col, ".2f", r"$\pm$",
                                     bold=lambda i, text, col=col: f"\\textbf{{{text}}}" if (i, col) in bold else text)
        elif pd.api.types.is_float_dtype(body[col]):
            body[col] = ["-" if _is_missing(v) else number(i, col, v) for i, v in enumerate(body[col])]
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


def table_notes(df: pd.DataFrame, notes: str) -> str:
    """The notes under a table: the run's notes, and how to read ± when the table shows intervals."""
    return f"{notes} {INTERVAL_NOTE}" if has_intervals(df) else notes


def table_to_latex(df: pd.DataFrame, notes: str = "") -> str:
    """LaTeX with the table's best cells in bold and its caption followed by `notes`."""
    caption = " ".join(p for p in (df.attrs.get("caption", ""), table_notes(df, notes)) if p)
    return to_latex(df, caption=caption, bold=bold_cells(df))
