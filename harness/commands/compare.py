"""`harness compare`: check a run against a baseline (paired bootstrap per metric, recovery vs FP); exit 1 on a
regression. `--save-baseline NAME` writes a baseline from a run instead (metrics + per-sample records)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qvlm_harness.commands.common import csv_list
from qvlm_harness.errors import HarnessError


def _recovery_pair(text: str) -> tuple[str, float]:
    bits, sep, value = text.partition("=")
    try:
        return bits.strip().lower(), float(value)
    except ValueError:
        raise HarnessError(f"--recovery-for takes BITS=FRACTION, e.g. w4a4=0.5; got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare a run with a baseline (exit 1 on regression), or save a baseline")
    p.add_argument("--output", type=Path, default=Path("results"), help="folder of the run (holds harness.db)")
    p.add_argument("--store", type=Path, default=None, help="SQLite store (default: <output>/harness.db)")
    p.add_argument("--run", default=None, help="compare this run id (default: every cell in the store, newest wins)")
    p.add_argument("--model", default=None, help="model id, when the store holds several")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--baseline", help="baseline JSON path, or a NAME in --baselines-dir")
    src.add_argument("--baseline-run", help="compare with another run in a store instead of a baseline file")
    src.add_argument("--save-baseline", metavar="NAME", help="write <baselines-dir>/NAME.json from the run and exit")
    p.add_argument("--baseline-store", type=Path, default=None, help="store of --baseline-run (default: --store)")
    p.add_argument("--baselines-dir", type=Path, default=Path("results/baselines"))
    p.add_argument("--recovery", type=float, default=0.95, help="quantized >= RECOVERY x FP (default 0.95)")
    p.add_argument("--recovery-for", type=_recovery_pair, action="append", default=[], metavar="BITS=FRACTION",
                   help="per-bits recovery threshold, e.g. w4a4=0.5 (repeatable)")
    p.add_argument("--gate", default="primary",
                   help="metrics that can fail the check: primary (each task's), all, or a comma list")
    p.add_argument("--min-drop", type=float, default=0.0,
                   help="a significant drop must also exceed this many points to fail (default 0)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (seeded)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--allow-model-change", action="store_true",
                   help="compare although the model weights differ (by default a stale baseline fails)")
    p.add_argument("--only-gated", action="store_true", help="print only the gated metrics")
    p.add_argument("--json", type=Path, default=None, help="also write the comparison as JSON here")


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness import regression
    from qvlm_harness.store import Store

    store_path = args.store or args.output / "harness.db"
    if not store_path.is_file():
        raise HarnessError(f"no store at {store_path}; pass --output (the run's folder) or --store")
    store = Store(store_path)
    current = regression.cells_from_store(store, run_id=args.run, model=args.model)
    if args.save_baseline:
        path = regression.baseline_path(args.save_baseline, args.baselines_dir)
        source = {"store": str(store_path), "run": args.run, "cells": len(current)}
        regression.save_baseline(current, path, name=Path(path).stem, source=source)
        print(f"baseline {path}: {len(current)} cells, {sum(len(c.entries) for c in current)} per-sample records")
        return 0
    if args.baseline_run:
        other = Store(args.baseline_store) if args.baseline_store else store
        baseline = regression.cells_from_store(other, run_id=args.baseline_run)
        print(f"baseline: run {args.baseline_run} in {other.path} ({len(baseline)} cells)")
    else:
        path = regression.baseline_path(args.baseline, args.baselines_dir)
        meta, baseline = regression.load_baseline(path)
        print(f"baseline: {path} ({meta.get('name')}, {len(baseline)} cells, model {meta.get('model')}, "
              f"created {meta.get('created')})")
    gate = args.gate if args.gate in ("primary", "all") else csv_list(args.gate)
    if args.resamples < 1:
        raise HarnessError("--resamples must be a positive number")
    comp = regression.compare(current, baseline, gate=gate, recovery=args.recovery,
                              recovery_for=dict(args.recovery_for), ci=args.ci, n_resamples=args.resamples,
                              seed=args.seed, min_drop=args.min_drop, allow_model_change=args.allow_model_change)
    print(f"run: {store_path}{f' run {args.run}' if args.run else ''} ({len(current)} cells); paired bootstrap, "
          f"{args.resamples} resamples, seed {args.seed}; recovery >= {args.recovery} x FP\n")
    print(regression.format_comparison(comp, only_gated=args.only_gated))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(regression.comparison_to_dict(comp), indent=1, default=str) + "\n")
    return 0 if comp.ok else 1
