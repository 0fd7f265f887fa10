"""`harness ablate METHOD --param NAME=V1,V2 ...`: run a method over a grid of its options.

Every combination is an ordinary run (the runner, the store, resume): its options travel as
`RunSpec.method_options`, so each combination is its own cell in the store and a rerun reuses finished cells.
Prints and writes an accuracy table and a search-cost table (seconds, peak memory, per stage, and whatever summary
columns the method derives from its own report through `Method.report_columns`, e.g. Q-VLM's block counts).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qvlm_harness import plugins
from qvlm_harness.commands.common import add_run_arguments, csv_list, run_spec_from_args
from qvlm_harness.errors import HarnessError


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="run a method over a grid of its options (accuracy and search-cost tables)")
    p.add_argument("method", help="the method to ablate (see `harness ls methods --options`)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="an option and its values; repeat for a grid, e.g. --param p=0.25,0.5 --param max_depth=1,3")
    add_run_arguments(p, methods_required=False)
    for action in p._actions:  # an ablation defaults to ScienceQA (the paper's ablation task)
        if "--tasks" in action.option_strings:
            action.required, action.default = False, plugins.DEFAULT_CALIB_TASK
            action.help = f"comma list (default {plugins.DEFAULT_CALIB_TASK}), e.g. {plugins.EXAMPLE_TASKS}"


def parse_params(pairs: list[str]) -> dict[str, list]:
    grid: dict[str, list] = {}
    for pair in pairs:
        name, sep, values = pair.partition("=")
        name = name.strip()
        if not sep or not name or not values.strip():
            raise HarnessError(f"--param takes NAME=V1,V2,...; got {pair!r} (e.g. --param p=0.25,0.5,0.75)")
        if name in grid:
            raise HarnessError(f"--param {name} given twice; list all its values in one --param")
        parsed = []
        for v in csv_list(values):
            try:
                parsed.append(json.loads(v))
            except json.JSONDecodeError:
                parsed.append(v)
        grid[name] = parsed
    return grid


def combinations(grid: dict[str, list]) -> list[dict]:
    if not grid:
        return [{}]
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))]


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness import plugins
    from qvlm_harness.report import to_markdown
    from qvlm_harness.runner import Runner

    if args.methods:
        raise HarnessError("harness ablate takes the method as its first argument, not --methods")
    method = plugins.methods.resolve_name(args.method)
    grid = parse_params(args.param)
    combos = combinations(grid)
    args.methods = method
    base = run_spec_from_args(args)
    base_options = base.method_options.get(method, {})
    cls = plugins.methods.get(method)
    for combo in combos:  # option typos fail here, before any model is loaded
        cls(**(base_options | combo))
    print(f"ablating {method}: {len(combos)} combination(s) x {len(base.bits)} bit-width(s) x {len(base.tasks)} "
          f"task(s)", file=sys.stderr)
    t0 = time.time()
    records = []
    for i, combo in enumerate(combos, start=1):
        spec = run_spec_from_args(args)
        spec.method_options = dict(spec.method_options)
        spec.method_options[method] = base_options | combo
        label = ", ".join(f"{k}={v}" for k, v in combo.items()) or "defaults"
        print(f"[{i}/{len(combos)}] {label}", file=sys.stderr)
        runner = Runner(spec, log=lambda m: print(m, file=sys.stderr), progress=not args.no_progress)
        result = runner.run()
        for row in result.rows:
            task = runner.tasks[row.task]
            records.append(_record(combo, row, task.primary_metric, cls.report_columns))
    if not records:
        raise HarnessError("the ablation produced no rows")
    import pandas as pd

    table = pd.DataFrame(records)
    params = list(grid)
    acc_cols = params + ["bits", "task", "metric", "value"]
    cost_cols = params + ["bits", "task", "search_s", "peak_rss_mb"]
    method_cols = [c for c in table.columns if c not in set(acc_cols + cost_cols) and not c.startswith("stage_")]
    cost_cols += method_cols + sorted(c for c in table.columns if c.startswith("stage_"))
    folder = Path(args.output) / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    table.to_csv(folder / f"{stem}.csv", index=False)
    acc_md, cost_md = to_markdown(table[acc_cols]), to_markdown(table[[c for c in cost_cols if c in table]])
    (folder / f"{stem}.md").write_text(f"## {method} ablation: accuracy\n\n{acc_md}\n\n## search cost\n\n{cost_md}\n")
    print(f"accuracy:\n{acc_md}\n\nsearch cost:\n{cost_md}")
    print(f"\n{len(records)} rows; {time.time() - t0:.0f}s. Tables: {folder / stem}.csv/.md; store: {base.store_path}")
    return 0


def _record(combo: dict, row, metric: str, report_columns: Callable[[dict], dict]) -> dict:
    report = (row.settings or {}).get("report") or {}
    rec = dict(combo) | {
        "bits": row.bits, "task": row.task, "metric": metric, "value": row.metrics.get(metric),
        "search_s": round(float(row.search_cost.get("seconds", 0.0)), 1),
        "peak_rss_mb": round(float(row.search_cost.get("peak_rss_mb", 0.0)), 0),
    }
    rec |= {k: v for k, v in report_columns(report).items() if k not in rec}  # the method's own summary columns
    for stage, seconds in (row.search_cost.get("stages") or {}).items():
        rec[f"stage_{stage}"] = round(float(seconds), 1)
    return rec
