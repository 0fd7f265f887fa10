"""`harness report`: re-render the tables of a stored run (default: the newest)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.commands.common import run_folder
from harness.errors import HarnessError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="re-render tables of a stored run (default: the newest)")
    p.add_argument("--run", default=None)
    p.add_argument("--output", type=Path, default=Path("results"))
    p.add_argument("--store", type=Path, default=None)


def execute(args: argparse.Namespace) -> int:
    from harness.report import main_table, to_markdown, write_tables
    from harness.store import Store

    store = Store(args.store or args.output / "harness.db")
    runs = store.runs()
    if not runs:
        raise HarnessError(f"the store {store.path} has no results yet; run `harness run` first")
    run_id = args.run or runs[0][0]
    rows = list(store.rows(run_id=run_id))
    if not rows:
        raise HarnessError(f"no run {run_id!r} in {store.path}; known runs: {', '.join(r[0] for r in runs[:5])}")
    folder = run_folder(args.output, rows[0].model, run_id)
    write_tables(rows, folder)
    print(to_markdown(main_table(rows)))
    print(f"\ntables written to {folder}/")
    return 0
