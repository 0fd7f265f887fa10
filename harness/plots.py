"""The report's plots (matplotlib, headless): accuracy vs bits per method, accuracy vs memory and vs latency with
the Pareto front, and each metric vs shots for the tasks that ask for it (`TaskMeta.figures`). Panel titles, units
and task order come from the task metadata stored with the rows: no task is named here.

Honesty rules carried into the figures: latency is plotted only for rows that did not run as simulated
quantization (their timings would be the float model's), and simulated rows on the memory plot are drawn hollow
(their size is what a packed format would take, not a measurement).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from qvlm_harness.config import QuantSpec
from qvlm_harness.report import and_join, task_labels, task_meta, task_metas, task_shots_order
from qvlm_harness.store import ResultRow
from qvlm_harness.task import SHOTS_FIGURE

MARKERS = "osD^vP*Xh<>"
PANEL = (4.2, 3.3)


def _bits_order(bits: str) -> tuple:
    if bits == "fp":
        return (0, 0, 0, "")
    spec = QuantSpec.parse(bits)
    return (1, -spec.w_bits, -spec.a_bits, bits)


def _colors(methods: Sequence[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(sorted(methods))}


FIGURE_CAPTIONS = {
    "accuracy_vs_bits": "Primary metric of each method over bit settings; dashed lines: unquantized baselines.",
    "accuracy_vs_memory": "Primary metric vs packed weight memory; dotted: Pareto front.",
    "accuracy_vs_latency": "Primary metric vs prefill latency (real or float execution only); dotted: Pareto front.",
}


def _panel_titles(rows: Sequence[ResultRow]) -> dict[tuple[str, int], str]:
    """(task, shots) -> "HM 4-shot (ROC AUC, %)": the task's label and its primary metric with the unit."""
    metas = task_metas(rows)
    labels = task_labels(metas)
    out = {}
    for task, shots in task_shots_order(rows):
        meta = metas[task]
        what = ", ".join(p for p in (meta.metric_name(meta.primary), meta.unit) if p)
        out[(task, shots)] = f"{labels[task]}{f' {shots}-shot' if shots else ''} ({what})"
    return out


def _figure(n: int) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL[0] * cols, PANEL[1] * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _primary_values(rows: Sequence[ResultRow]):
    """row -> its task's primary metric (one metric per panel, as in the tables)."""
    primary = {task: meta.primary for task, meta in task_metas(rows).items()}
    return lambda row: float(row.metrics.get(primary[row.task], math.nan))


def accuracy_vs_bits(rows: Sequence[ResultRow]) -> Figure | None:
    """One panel per task: each quantized method's primary metric over bit settings (high to low precision);
    unquantized baselines as dashed horizontal lines."""
    quantized = [r for r in rows if r.bits != "fp"]
    if not quantized:
        return None
    panels = task_shots_order(rows)
    titles = _panel_titles(rows)
    value_of = _primary_values(rows)
    colors = _colors({r.method_label for r in rows})
    order = sorted({r.bits for r in quantized}, key=_bits_order)
    fig, axes = _figure(len(panels))
    for ax, (task, shots) in zip(axes, panels, strict=True):
        cell = [r for r in rows if r.task == task and r.shots == shots]
        for r in (r for r in cell if r.bits == "fp"):
            ax.axhline(value_of(r), color=colors[r.method_label], linestyle="--", linewidth=1.2,
                       label=f"{r.method_label} (FP)")
        for method in sorted({r.method_label for r in cell if r.bits != "fp"}):
            pts = sorted((r for r in cell if r.method_label == method and r.bits != "fp"),
                         key=lambda r: _bits_order(r.bits))
            ax.plot([order.index(r.bits) for r in pts], [value_of(r) for r in pts], marker="o", color=colors[method],
                    label=method)
        ax.set_xticks(range(len(order)), [b.upper() for b in order])
        ax.set_title(titles[(task, shots)], fontsize=10)
        ax.set_xlabel("bits (weights/activations)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Accuracy vs bits", fontsize=11)
    fig.tight_layout()
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (smaller x, larger y), sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def accuracy_vs_cost(rows: Sequence[ResultRow], cost: str) -> Figure | None:
    """Primary metric against packed weight memory (cost="memory") or prefill latency (cost="latency"), one
    panel per task, with the Pareto front of each panel."""
    if cost == "memory":
        key, label = "weight_mb_packed", "weights (MB, packed)"
        usable = [r for r in rows if r.measurements.get(key) is not None]
    elif cost == "latency":
        key, label = "prefill_ms_per_sample", "prefill latency (ms / sample)"
        usable = [r for r in rows if r.measurements.get(key) is not None and r.execution != "simulated"]
    else:
        raise ValueError(f"cost must be 'memory' or 'latency', got {cost!r}")
    if not usable:
        return None
    panels = task_shots_order(usable)
    titles = _panel_titles(rows)
    value_of = _primary_values(rows)
    colors = _colors({r.method_label for r in rows})
    fig, axes = _figure(len(panels))
    for ax, (task, shots) in zip(axes, panels, strict=True):
        cell = [r for r in usable if r.task == task and r.shots == shots and math.isfinite(value_of(r))]
        bits_all = sorted({r.bits for r in cell}, key=_bits_order)
        for r in cell:
            hollow = r.execution == "simulated"
            ax.scatter(r.measurements[key], value_of(r), s=42, marker=MARKERS[bits_all.index(r.bits) % len(MARKERS)],
                       facecolors="none" if hollow else colors[r.method_label], edgecolors=colors[r.method_label],
                       linewidths=1.5)
            ax.annotate(f"{r.method_label} {r.bits.upper() if r.bits != 'fp' else 'FP'}",
                        (r.measurements[key], value_of(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(r.measurements[key], value_of(r)) for r in cell])
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], drawstyle="steps-post", color="0.35", linewidth=1,
                    linestyle=":", marker="o", markersize=12, markerfacecolor="none", label="Pareto front")
        ax.set_title(titles[(task, shots)], fontsize=10)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    note = "hollow = simulated (size a packed format would take)" if cost == "memory" else \
        "simulated rows omitted: their timings are the float model's"
    fig.suptitle(f"Accuracy vs {cost} ({note})", fontsize=10)
    fig.tight_layout()
    return fig


def shots_figure_name(task: str) -> str:
    """The figure's (and PNG file's) name: "<task>_vs_shots", the task name made file-safe."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}_vs_shots"


def metric_vs_shots(rows: Sequence[ResultRow], task: str) -> Figure | None:
    """One panel per ranked metric of a task against the number of in-context examples, per method x bits, with
    the spread over seeded trials as error bars; None unless the rows hold at least two shot counts."""
    own = [r for r in rows if r.task == task]
    meta = task_meta(rows, task)
    metrics = [m for m in meta.metrics if meta.is_ranked(m)]
    if len({r.shots for r in own}) < 2 or not metrics:
        return None
    colors = _colors({r.method_label for r in rows})
    fig, axes = _figure(len(metrics))
    settings = sorted({(r.method_label, r.bits) for r in own}, key=lambda k: (_bits_order(k[1]), k[0]))
    bits_all = sorted({r.bits for r in own}, key=_bits_order)
    for ax, metric in zip(axes, metrics, strict=True):
        for method, bits in settings:
            pts = sorted((r for r in own if (r.method_label, r.bits) == (method, bits)), key=lambda r: r.shots)
            ys = [r.metrics.get(metric, math.nan) for r in pts]
            errs = [r.metrics.get(f"{metric}_std", 0.0) or 0.0 for r in pts]
            ax.errorbar([r.shots for r in pts], ys, yerr=errs, marker=MARKERS[bits_all.index(bits) % len(MARKERS)],
                        color=colors[method], capsize=3, linestyle="--" if bits == "fp" else "-",
                        label=f"{method} {'FP' if bits == 'fp' else bits.upper()}")
        ax.set_xlabel("shots")
        ax.set_title(f"{meta.display_title} {meta.axis_label(metric)}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{meta.display_title} vs shots (error bars: std over trials)", fontsize=11)
    fig.tight_layout()
    return fig


def _shots_tasks(rows: Sequence[ResultRow]) -> list[str]:
    return [task for task, meta in task_metas(rows).items() if SHOTS_FIGURE in meta.figures]


def report_figures(rows: Sequence[ResultRow]) -> dict[str, Figure]:
    """name -> figure, for the plots the rows can support (a plot without data is left out, not drawn empty)."""
    figures = {"accuracy_vs_bits": accuracy_vs_bits(rows), "accuracy_vs_memory": accuracy_vs_cost(rows, "memory"),
               "accuracy_vs_latency": accuracy_vs_cost(rows, "latency")}
    figures |= {shots_figure_name(task): metric_vs_shots(rows, task) for task in _shots_tasks(rows)}
    return {k: v for k, v in figures.items() if v is not None}


def figure_captions(rows: Sequence[ResultRow]) -> dict[str, str]:
    """name -> caption of every figure `report_figures` can draw from these rows."""
    captions = dict(FIGURE_CAPTIONS)
    for task in _shots_tasks(rows):
        meta = task_meta(rows, task)
        names = [meta.metric_name(m) for m in meta.metrics if meta.is_ranked(m)]
        if names:
            captions[shots_figure_name(task)] = (f"{meta.display_title} {and_join(names)} vs number of in-context "
                                                 "examples.")
    return captions


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
