"""`harness report` end to end on a tiny run: paper tables, plots and the HTML page land where it says."""

from __future__ import annotations

from qvlm_harness.cli import main
from qvlm_harness.store import Store
from qvlm_harness.tasks.hateful_memes import HatefulMemes


def test_report_all_writes_tables_plots_and_html(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert main(["run", "--methods", "fp32,rtn", "--bits", "w4a4", "--tasks", "hm", "--shots", "0,2",
                 "--model", str(tiny_model_dir), "--limit", "8", "--output", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    stored = list(Store(out / "harness.db").rows())
    assert len(stored) == 4 and all(r.settings["task_meta"] == HatefulMemes().metadata().to_dict() for r in stored)
    assert main(["report", "--output", str(out), "--all", "--formats", "tex,md"]) == 0
    text = capsys.readouterr().out
    folder = out / "tiny" / "report" if (out / "tiny").exists() else next(out.glob("*/report"))
    assert f"HTML report: {folder / 'report.html'}" in text
    assert {p.name for p in (folder / "paper").iterdir()} == {"datasets.tex", "datasets.md", "efficiency.tex",
                                                              "efficiency.md"}  # no sqa rows, no sqa table
    assert {p.stem for p in (folder / "plots").glob("*.png")} >= {"accuracy_vs_bits", "hm_vs_shots"}
    page = (folder / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(list((folder / "plots").glob("*.png")))
    assert main(["report", "--output", str(out), "--formats", "pdf"]) == 2
