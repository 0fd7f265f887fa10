"""`harness report`: render a stored run (default: the newest) or the whole store: the run's tables, the paper's
tables (the breakdowns tasks declare as paper tables, per dataset, latency/memory) as CSV/LaTeX/Markdown, the plots,
and a one-page self-contained HTML report. Everything task-specific comes from the metadata stored in the rows."""

from __future__ import annotations

import argparse
from pathlib import Path

from qvlm_harness.commands.common import DEFAULT_MODEL_CAVEAT, csv_list, run_folder
from qvlm_harness.errors import HarnessError

FORMATS = ("csv", "tex", "md")


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="tables, plots and an HTML report from the store (default: the newest run)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--run", default=None, help="a run id (default: the newest run)")
    which.add_argument("--all", action="store_true", help="every cell in the store (newest per cell)")
    p.add_argument("--model", default=None, help="model id, when the store holds several")
    p.add_argument("--output", type=Path, default=Path("results"))
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="folder to write to (default: the run's folder, or <output>/<model>/report with --all)")
    p.add_argument("--formats", default=",".join(FORMATS), help="table formats: comma list of csv,tex,md")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (and the HTML report)")
    p.add_argument("--title", default="Quantization benchmark report")


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness.report import dedupe, main_table, to_markdown, write_paper_tables, write_tables
    from qvlm_harness.store import Store

    formats = csv_list(args.formats)
    if not formats or any(f not in FORMATS for f in formats):
        raise HarnessError(f"--formats takes a comma list of {', '.join(FORMATS)}; got {args.formats!r}")
    store_path = args.store or args.output / "harness.db"
    if not store_path.is_file():
        raise HarnessError(f"no store at {store_path}; run `harness run` first or pass --output/--store")
    store = Store(store_path)
    runs = store.runs()
    if not runs:
        raise HarnessError(f"the store {store.path} has no results yet; run `harness run` first")
    if args.all:
        rows = list(store.rows())
        label = "all"
    else:
        run_id = args.run or runs[0][0]
        rows = list(store.rows(run_id=run_id))
        label = run_id
        if not rows:
            raise HarnessError(f"no run {run_id!r} in {store.path}; known runs: {', '.join(r[0] for r in runs[:5])}")
    if args.model:
        rows = [r for r in rows if r.model == args.model]
    models = sorted({r.model for r in rows})
    if len(models) != 1:
        raise HarnessError(f"{'no rows' if not models else 'several models: ' + ', '.join(models)} in the selection; "
                           "pick one with --model")
    rows = dedupe(rows)
    model = models[0]
    if args.out:
        folder = args.out
    elif args.all:
        folder = args.output / model.replace("/", "_") / "report"
    else:
        folder = run_folder(args.output, model, label)
    caveat = DEFAULT_MODEL_CAVEAT if model.startswith("default") else None
    write_tables(rows, folder, caveat=caveat)
    written = write_paper_tables(rows, folder / "paper", formats=formats, caveat=caveat)
    print(to_markdown(main_table(rows)))
    print(f"\ntables: {folder}/ (per run) and {folder / 'paper'}/ ({', '.join(written)}: {', '.join(formats)})")
    if not args.no_plots:
        html_path = write_plots_and_html(rows, folder, title=args.title, caveat=caveat)
        print(f"plots: {folder / 'plots'}/\nHTML report: {html_path}")
    return 0


def write_plots_and_html(rows, folder: Path, *, title: str, caveat: str | None) -> Path:
    from qvlm_harness.html_report import render_html
    from qvlm_harness.plots import png_bytes, report_figures
    from qvlm_harness.report import SIMULATED_NOTE, paper_tables

    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, fig in report_figures(rows).items():
        images[name] = png_bytes(fig)
        (plots / f"{name}.png").write_bytes(images[name])
    notes = [SIMULATED_NOTE] + ([caveat] if caveat else [])
    path = folder / "report.html"
    path.write_text(render_html(rows, paper_tables(rows), images, title=title, notes=notes), encoding="utf-8")
    return path
