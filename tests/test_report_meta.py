"""Reports read the task metadata stored with each row: the built-in tasks' declarations, their JSON round trip,
the fallback for rows stored before tasks declared any, a third-party task the harness has never heard of (its
label, its column order, its lower-is-better metric in bold and in regression checks), and confidence intervals
shown as "value ±half-width"."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qvlm_harness import plugins
from qvlm_harness.html_report import table_html
from qvlm_harness.plots import figure_captions, report_figures
from qvlm_harness.regression import CellScores, compare
from qvlm_harness.report import (
    best_cells,
    main_table,
    multi_dataset_table,
    paper_tables,
    task_table,
    to_markdown,
    write_paper_tables,
    write_tables,
)
from qvlm_harness.store import ResultRow
from qvlm_harness.table_format import bold_cells
from qvlm_harness.task import SHOTS_FIGURE, Request, Response, Sample, Task, TaskMeta, row_task_meta
from tests.report_rows import synthetic_rows

BUILTIN = ("sqa", "vqav2", "vizwiz", "hm")


# -- a third-party task, known only to this file -----------------------------------------------------------------------
class ToyTranscription(Task):
    """Word error rate (lower is better) and exact-match rate; declared display order: WER first."""

    name = "toy-asr"
    primary_metric = "wer"
    metrics = ("exact", "wer")
    supports_shots = True
    report_meta = TaskMeta(label="Toy ASR", metrics=("wer", "exact"), primary="wer",
                           metric_labels={"wer": "WER", "exact": "Exact"},
                           metric_names={"wer": "word error rate", "exact": "exact match"}, unit="%",
                           lower_is_better=("wer",), varies_by_shots=True, figures=(SHOTS_FIGURE,),
                           caption="Toy transcription: word error rate and exact match.")

    def load(self, split: str, data_dir: Path | None = None) -> list[Sample]:
        return []

    def request(self, sample: Sample, *, scoring: str = "generate", demos: Sequence[Sample] = ()) -> Request:
        return Request(sample.id, "transcribe", None)

    def score(self, sample: Sample, response: Response) -> dict:
        return {"errors": 0.0, "words": 1.0}

    def aggregate(self, records: Sequence[dict]) -> dict[str, float]:
        errors = sum(r["errors"] for r in records)
        words = sum(r["words"] for r in records)
        exact = sum(r["errors"] == 0 for r in records)
        return {"wer": 100.0 * errors / words, "exact": 100.0 * exact / len(records), "n": float(len(records))}

    def target(self, sample: Sample) -> str:
        return ""


class Undeclared(ToyTranscription):
    """The same task without a declaration: the base class derives its metadata from the class attributes."""

    name = "toy-undeclared"
    report_meta = None


def toy_row(method: str, bits: str, wer: float, exact: float, *, shots: int = 0, task: Task | None = None,
            settings: dict | None = None, extra: dict | None = None) -> ResultRow:
    task = task or ToyTranscription()
    stored = {"primary_metric": task.primary_metric, "task_meta": task.metadata().to_dict()} if settings is None \
        else settings
    return ResultRow(cell_id=f"{method}-{bits}-{task.name}-{shots}", run_id="r", model="m", method=method, bits=bits,
                     task=task.name, split="test", seed=0, n_samples=10, execution="float" if bits == "fp" else
                     "simulated", metrics={"exact": exact, "wer": wer, "n": 10.0} | (extra or {}), shots=shots,
                     measurements={"prefill_ms_per_sample": 10.0, "weight_mb_packed": 5.0}, settings=stored)


def toy_rows() -> list[ResultRow]:
    return [toy_row("fp32", "fp", 12.0, 60.0), toy_row("rtn", "w8a8", 15.5, 70.0),
            toy_row("rtn", "w4a4", 31.0, 40.0), toy_row("fp32", "fp", 10.0, 65.0, shots=2),
            toy_row("rtn", "w8a8", 14.0, 61.0, shots=2), toy_row("rtn", "w4a4", 30.0, 45.0, shots=2)]


# -- the built-in declarations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_declarations_agree_with_the_task_and_survive_json(name):
    task = plugins.tasks.get(name)()
    meta = task.metadata()
    assert meta.primary == task.primary_metric
    assert set(meta.metrics) == set(task.metrics)  # every metric the task reports, each once
    assert len(meta.metrics) == len(set(meta.metrics))
    assert set(meta.lower_is_better) | set(meta.unranked) <= set(meta.metrics)
    assert meta.varies_by_shots == task.supports_shots
    assert TaskMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta


def test_from_dict_ignores_keys_of_a_newer_version():
    meta = ToyTranscription().metadata()
    assert TaskMeta.from_dict(meta.to_dict() | {"colour": "blue"}) == meta


def test_undeclared_task_gets_metadata_from_its_attributes():
    meta = Undeclared().metadata()
    assert (meta.label, meta.metrics, meta.primary) == ("toy-undeclared", ("exact", "wer"), "wer")
    assert meta.varies_by_shots and meta.figures == (SHOTS_FIGURE,) and meta.lower_is_better == ()
    assert meta.metric_label("wer") == "wer"


def test_lmeval_task_declares_its_metrics_with_their_standard_errors():
    pytest.importorskip("lm_eval")
    from qvlm_harness.tasks.lmeval import LMEvalTask

    task = LMEvalTask("qvlm_sqa_mc", include_path=str(Path(__file__).parent / "data" / "lmeval"))
    meta = task.metadata()
    assert meta.label == "lmeval:qvlm_sqa_mc" and meta.primary == task.primary_metric == "acc,none"
    assert meta.metrics == ("acc,none", "acc_stderr,none") and meta.unranked == ("acc_stderr,none",)
    assert meta.lower_is_better == () and meta.unit == ""


# -- rows stored before tasks declared metadata ------------------------------------------------------------------------
def test_row_without_metadata_falls_back_to_its_name_and_stored_metrics():
    legacy = {"primary_metric": "wer"}
    rows = [toy_row("fp32", "fp", 12.0, 60.0, settings=legacy, extra={"exact_std": 1.0, "wer_ci_lo": 10.0,
                                                                       "wer_ci_hi": 14.0}),
            toy_row("rtn", "w8a8", 15.5, 70.0, settings={})]
    meta = row_task_meta(rows[0])
    assert (meta.label, meta.metrics, meta.primary) == ("toy-asr", ("exact", "wer"), "wer")
    assert row_task_meta(rows[1]).primary == "exact"  # nothing recorded: the first stored metric
    table = task_table(rows, "toy-asr")
    assert [c for c in table.columns if "±" not in c] == ["Method", "Bits", "Activations", "Exec", "exact", "wer", "N"]
    assert list(table["exact ±"].fillna(-1)) == [1.0, -1]
    main = main_table(rows)
    assert list(main["toy-asr"]) == [12.0, 15.5]  # the first row's recorded primary; the task's name as label
    assert "toy-asr" in to_markdown(multi_dataset_table(rows))


def test_stored_metadata_wins_over_the_fallback_for_the_whole_task():
    rows = [toy_row("fp32", "fp", 12.0, 60.0, settings={}), toy_row("rtn", "w8a8", 15.5, 70.0)]
    table = task_table(rows, "toy-asr")
    assert list(table.columns) == ["Method", "Bits", "Activations", "Exec", "Shots", "WER", "Exact", "N"]


# -- a third-party task with its own metadata ----------------------------------------------------------------------
def test_third_party_task_renders_its_label_order_and_lower_is_better(tmp_path):
    rows = toy_rows()
    table = task_table(rows, "toy-asr")
    assert list(table.columns) == ["Method", "Bits", "Activations", "Exec", "Shots", "WER", "Exact", "N"]
    assert list(table["Shots"]) == [0, 2, 0, 2, 0, 2]  # varies by shots: a Shots column also for 0-shot rows
    bold = bold_cells(table)
    best_wer = table["WER"].min()
    assert {(i, c) for i, c in bold if c == "WER"} == {(i, "WER") for i in np.flatnonzero(table["WER"] == best_wer)}
    assert {(i, c) for i, c in bold if c == "Exact"} == {(int(table["Exact"].idxmax()), "Exact")}
    assert best_cells(table, lower=["WER"]) == {(i, c) for i, c in bold if c == "WER"}

    datasets = multi_dataset_table(rows)
    assert list(datasets.columns) == ["Method", "Bits", "Activations", "Exec", "Toy ASR", "Toy ASR 2-shot"]
    assert datasets.attrs["caption"] == "Primary metric per dataset: word error rate (%) for Toy ASR."
    fp = datasets.index[datasets["Method"] == "fp32"][0]
    assert (fp, "Toy ASR") in bold_cells(datasets) and (fp, "Toy ASR 2-shot") in bold_cells(datasets)

    written = write_tables(rows, tmp_path)
    tex = (tmp_path / "toy-asr.tex").read_text()
    assert r"\textbf{10.00}" in tex and r"\textbf{31.00}" not in tex and "Toy transcription" in tex
    assert set(written) == {"main", "toy-asr"}
    assert set(paper_tables(rows)) == {"datasets", "efficiency"}  # it did not ask for a paper table


def test_third_party_task_gets_its_shots_figure_and_titles():
    rows = toy_rows()
    figures = report_figures(rows)
    assert "toy-asr_vs_shots" in figures
    titles = [ax.get_title() for ax in figures["toy-asr_vs_shots"].axes if ax.get_visible()]
    assert titles == ["Toy ASR word error rate (%)", "Toy ASR exact match (%)"]
    bits_titles = [ax.get_title() for ax in figures["accuracy_vs_bits"].axes if ax.get_visible()]
    assert bits_titles == ["Toy ASR (word error rate, %)", "Toy ASR 2-shot (word error rate, %)"]
    assert figure_captions(rows)["toy-asr_vs_shots"] == ("Toy ASR word error rate and exact match vs number of "
                                                         "in-context examples.")


def test_tasks_appear_in_the_order_of_the_rows():
    rows = synthetic_rows()
    hm_first = [r for r in rows if r.task == "hm"] + [r for r in rows if r.task != "hm"]
    assert list(multi_dataset_table(hm_first).columns[4:]) == ["HM", "HM 4-shot", "ScienceQA", "VQAv2", "VizWiz"]
    assert list(main_table(toy_rows() + rows).columns[4:6]) == ["Toy ASR", "Toy ASR 2-shot"]


def test_same_label_from_two_tasks_gets_told_apart():
    clash = dataclasses.replace(ToyTranscription.report_meta, label="ScienceQA")
    other = toy_row("fp32", "fp", 12.0, 60.0, settings={"task_meta": clash.to_dict()})
    columns = list(multi_dataset_table([*synthetic_rows(), other]).columns)
    assert "ScienceQA (sqa)" in columns and "ScienceQA (toy-asr)" in columns


def _cell(method: str, bits: str, errors: np.ndarray, task: str) -> CellScores:
    entries = [{"trial": 0, "id": f"u{i}", "record": {"errors": float(e), "words": 1.0}} for i, e in enumerate(errors)]
    metrics = {"wer": 100.0 * float(np.mean(errors)), "exact": 100.0 * float(np.mean(errors == 0)),
               "n": float(len(errors))}
    return CellScores(method, bits, task, 0, metrics, entries)


@pytest.mark.parametrize("task_cls", [ToyTranscription, Undeclared])
def test_regression_follows_the_declared_direction(monkeypatch, task_cls):
    """Fewer errors is an improvement for a task that declares WER lower-is-better, a regression for one that does
    not (the base class cannot know): the direction comes from the task, not from a list in the engine."""
    known = plugins.tasks.get
    monkeypatch.setattr(plugins.tasks, "get", lambda name: task_cls if name == task_cls.name else known(name))
    errors = (np.random.default_rng(0).random(200) < 0.3).astype(float)
    fewer = errors.copy()
    fewer[np.flatnonzero(errors == 1)[:40]] = 0  # 20 points fewer errors
    comp = compare([_cell("rtn", "w4a4", fewer, task_cls.name)], [_cell("rtn", "w4a4", errors, task_cls.name)],
                   n_resamples=200)
    (wer,) = [c for c in comp.checks if c.metric == "wer"]
    assert wer.delta.estimate == pytest.approx(-20.0) and wer.delta.high < 0
    declared = task_cls is ToyTranscription
    assert wer.lower_is_better is declared and wer.gated
    assert wer.status == ("improved" if declared else "regressed") and comp.ok is declared
    worse = compare([_cell("rtn", "w4a4", errors, task_cls.name)], [_cell("rtn", "w4a4", fewer, task_cls.name)],
                    n_resamples=200)
    (wer,) = [c for c in worse.checks if c.metric == "wer"]
    assert wer.status == ("regressed" if declared else "improved")


def _sqa_cell(method: str, bits: str, correct: np.ndarray, parsed: np.ndarray) -> CellScores:
    from qvlm_harness.metrics.sqa import aggregate_sqa

    records = [{"correct": bool(c), "parsed": bool(p), "subject": "natural science", "hint": "", "image": None,
                "grade": "grade3"} for c, p in zip(correct, parsed, strict=True)]
    entries = [{"trial": 0, "id": f"p{i}", "record": r} for i, r in enumerate(records)]
    return CellScores(method, bits, "sqa", 0, {k: float(v) for k, v in aggregate_sqa(records).items()}, entries)


def test_sqa_parse_failures_are_lower_is_better_in_regressions():
    """ScienceQA's declaration replaces the engine's former hard-coded set: fewer parse failures is an improvement,
    and the rate gets no recovery ratio against FP (a ratio of failure rates says nothing)."""
    rng = np.random.default_rng(1)
    correct = rng.random(200) < 0.6
    parsed = correct | (rng.random(200) < 0.5)  # about 20% of the answers unparsed (all of them wrong)
    fp = _sqa_cell("fp32", "fp", correct, np.ones(200, bool))
    comp = compare([fp, _sqa_cell("rtn", "w4a4", correct, np.ones(200, bool))],
                   [fp, _sqa_cell("rtn", "w4a4", correct, parsed)], gate="all", n_resamples=200)
    check = next(c for c in comp.checks if c.key[1] == "w4a4" and c.metric == "parse_fail")
    assert check.lower_is_better and check.delta.estimate == pytest.approx(-100 * float(np.mean(~parsed)))
    assert check.status == "improved" and check.recovery is None and comp.ok
    acc = next(c for c in comp.checks if c.key[1] == "w4a4" and c.metric == "acc")
    assert not acc.lower_is_better and acc.recovery == pytest.approx(1.0)


# -- confidence intervals --------------------------------------------------------------------------------------------
def rows_with_intervals() -> list[ResultRow]:
    """The synthetic rows, with an asymmetric interval on ScienceQA's average for every row but int8's, and one on
    VQAv2's accuracy for fp32 only."""
    rows = synthetic_rows()
    for r in rows:
        if r.task == "sqa" and r.method != "int8":
            r.metrics |= {"acc_ci_lo": r.metrics["acc"] - 2.0, "acc_ci_hi": r.metrics["acc"] + 5.4}
        if r.task == "vqav2" and r.method == "fp32":
            r.metrics |= {"acc_ci_lo": r.metrics["acc"] - 1.25, "acc_ci_hi": r.metrics["acc"] + 1.25}
        if r.task == "vizwiz":  # undefined intervals (NaN bounds) show as no interval
            r.metrics |= {"acc_ci_lo": math.nan, "acc_ci_hi": math.nan}
    return rows


def _md_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_intervals_fold_into_markdown_latex_and_html_and_stay_numeric_in_csv(tmp_path):
    rows = rows_with_intervals()
    sqa = {r.method + r.bits: r for r in rows if r.task == "sqa"}
    half = {k: (r.metrics["acc_ci_hi"] - r.metrics["acc_ci_lo"]) / 2 for k, r in sqa.items()
            if "acc_ci_lo" in r.metrics}
    assert half == pytest.approx(dict.fromkeys(("fp32fp", "rtnw8a8", "rtnw4a4"), 3.7))
    written = write_paper_tables(rows, tmp_path)

    csv = (tmp_path / "sqa.csv").read_text().splitlines()
    head = csv[0].split(",")
    assert head[head.index("Avg") + 1] == "Avg CI ±"  # the half-width right after its value, as a number
    frame = pd.read_csv(tmp_path / "sqa.csv")
    assert pd.api.types.is_float_dtype(frame["Avg"]) and pd.api.types.is_float_dtype(frame["Avg CI ±"])
    by_row = dict(zip(frame["Method"] + frame["Bits"], frame["Avg CI ±"], strict=True))
    assert by_row["fp32FP"] == pytest.approx(half["fp32fp"]) and math.isnan(by_row["int8W8A8"])
    assert list(frame["Avg"]) == [72.5, 71.5, 71.0, 54.25]  # the value column is the value, as without intervals

    md = _md_rows(written["sqa"]["md"].read_text())
    header, body = md[0], md[2:]
    assert "Avg CI ±" not in header and len({len(r) for r in md}) == 1
    avg = {r[0] + r[1]: r[header.index("Avg")] for r in body}
    assert avg == {"fp32FP": "72.50 ±3.70", "int8W8A8": "71.50", "rtnW8A8": "71.00 ±3.70", "rtnW4A4": "54.25 ±3.70"}
    assert md[1][header.index("Avg")].endswith(":")  # right-aligned like the numbers
    assert "half the width" in written["sqa"]["md"].read_text()

    tex = written["sqa"]["tex"].read_text()
    assert r"\textbf{72.50}$\pm$3.70" in tex and r"54.25$\pm$3.70" in tex and "CI" not in tex.split(r"\midrule")[0]
    fp_line = next(line for line in tex.splitlines() if line.startswith("fp32"))
    assert len(fp_line.split(" & ")) == len(header)

    datasets = _md_rows(written["datasets"]["md"].read_text())
    cells = dict(zip(datasets[0], datasets[2], strict=True))  # the fp32 row
    assert cells["ScienceQA"] == "72.50 ±3.70" and cells["VQAv2"] == "61.20 ±1.25" and cells["VizWiz"] == "40.00"
    assert "VizWiz CI ±" not in (tmp_path / "datasets.csv").read_text()
    assert "CI ±" not in (written["datasets"]["md"].read_text())

    page = table_html("sqa", paper_tables(rows)["sqa"])
    assert "<td><strong>72.50</strong> ±3.70</td>" in page and "<td>71.50</td>" in page and "CI ±" not in page
