"""Report rendering: the paper's tables against golden files, bolding rules, the Pareto front, the plots, and the
self-contained HTML page. Regenerate the golden files after an intended change with UPDATE_GOLDEN=1."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest

from qvlm_harness.html_report import render_html
from qvlm_harness.plots import pareto_front, png_bytes, report_figures
from qvlm_harness.report import best_cells, dedupe, paper_tables, write_paper_tables
from tests.report_rows import synthetic_rows

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", ["sqa", "datasets", "efficiency"])
@pytest.mark.parametrize("fmt", ["csv", "tex", "md"])
def test_paper_tables_match_golden_files(tmp_path, name, fmt):
    written = write_paper_tables(synthetic_rows(), tmp_path, caveat="Synthetic rows.")
    text = written[name][fmt].read_text()
    golden = GOLDEN / f"{name}.{fmt}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{name}.{fmt} differs from {golden}; UPDATE_GOLDEN=1 if intended"


def test_latex_bolds_the_best_in_the_right_direction():
    tables = paper_tables(synthetic_rows())
    tex = (GOLDEN / "efficiency.tex").read_text()
    # the real int8 kernel is fastest and smallest as stored; simulated rows never win on timings
    int8 = next(line for line in tex.splitlines() if line.startswith("int8"))
    assert r"\textbf{44.00}" in int8 and r"\textbf{135.00}" in int8
    simulated = [line.split(" & ") for line in tex.splitlines() if " & simulated & " in line]
    timings = [cell for cells in simulated for cell in cells[4:7] + [cells[8]]]  # prefill, decode, stored, RSS
    assert len(simulated) == 2 and not any(r"\textbf" in cell for cell in timings)
    # packed size counts for simulated rows too: rtn W4A4 packs smallest
    w4 = next(line for line in tex.splitlines() if line.startswith("rtn & W4A4"))
    assert r"\textbf{70.00}" in w4
    # accuracy: the largest per column; ties are all bold
    datasets = tables["datasets"]
    bold = best_cells(datasets, higher=["VQAv2"])
    assert bold == {(0, "VQAv2")} and datasets.loc[0, "Method"] == "fp32"
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex


def test_dedupe_keeps_the_newest_row_per_cell():
    rows = synthetic_rows()
    old = rows[0]
    newer = type(old)(**{**old.__dict__, "created": "2026-02-01T00:00:00", "metrics": {"acc": 1.0}})
    kept = dedupe([newer, *rows])
    assert len(kept) == len(rows) and newer in kept and old not in kept


def test_pareto_front_against_brute_force():
    import random

    rng = random.Random(0)
    points = [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(40)]
    front = pareto_front(points)
    dominated = {p for p in points for q in points if q != p and q[0] <= p[0] and q[1] >= p[1]
                 and (q[0] < p[0] or q[1] > p[1])}
    assert set(front) == set(points) - dominated
    assert [p[0] for p in front] == sorted(p[0] for p in front)


def test_figures_and_self_contained_html():
    rows = synthetic_rows()
    figures = report_figures(rows)
    assert set(figures) == {"accuracy_vs_bits", "accuracy_vs_memory", "accuracy_vs_latency", "hm_vs_shots"}
    images = {k: png_bytes(f) for k, f in figures.items()}
    assert all(v.startswith(b"\x89PNG") for v in images.values())
    page = render_html(rows, paper_tables(rows), images, notes=["a <note>"])
    assert "a &lt;note&gt;" in page  # notes are escaped
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == images["accuracy_vs_bits"]
    assert not re.search(r'(href|src)="(https?:)?//', page)  # nothing fetched from outside
    assert 'id="table-sqa"' in page and "<strong>" in page and "f00d" in page


def test_plots_drop_what_the_rows_cannot_support():
    rows = [r for r in synthetic_rows() if r.task != "hm" and r.execution == "simulated"]
    figures = report_figures(rows)
    assert "hm_vs_shots" not in figures  # no shots to plot
    assert "accuracy_vs_latency" not in figures  # simulated timings are never plotted
