"""`harness compare`: check a run against a baseline (paired bootstrap per metric, recovery vs FP); exit 1 on a
regression. `--save-baseline NAME` writes a baseline from a run instead (metrics + per-sample records).
`--methods A,B` compares two methods of the store on the same samples instead: A - B per task and bits with its
paired bootstrap interval, and whether A is significantly better, worse or not distinguishable."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from qvlm_harness import plugins
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
    src.add_argument("--methods", metavar="A,B",
                     help="compare method A with method B on the same samples (newest cells, or those of --run)")
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
    p.add_argument("--metrics", default="primary",
                   help="with --methods: primary (each task's), all, or a comma list of metrics")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the comparison as JSON to this file ('-': print the JSON instead of the table)")


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness import regression
    from qvlm_harness.store import Store
    from qvlm_harness.writable import check_output_file

    store_path = args.store or args.output / "harness.db"
    if not store_path.is_file():
        raise HarnessError(f"no store at {store_path}; pass --output (the run's folder) or --store")
    if args.json is not None and not _json_to_stdout(args):
        check_output_file(args.json, "--json")
    if args.save_baseline:
        check_output_file(regression.baseline_path(args.save_baseline, args.baselines_dir), "--save-baseline")
    store = Store(store_path)
    if args.methods:
        return _compare_methods(args, store)
    current = regression.cells_from_store(store, run_id=args.run, model=args.model)
    if args.save_baseline:
        path = regression.baseline_path(args.save_baseline, args.baselines_dir)
        source = {"store": str(store_path), "run": args.run, "cells": len(current)}
        regression.save_baseline(current, path, name=Path(path).stem, source=source)
        print(f"baseline {path}: {len(current)} cells, {sum(len(c.entries) for c in current)} per-sample records")
        return 0
    to_stdout = _json_to_stdout(args)
    say = (lambda *a: None) if to_stdout else print
    if args.baseline_run:
        other = Store(args.baseline_store) if args.baseline_store else store
        baseline = regression.cells_from_store(other, run_id=args.baseline_run)
        say(f"baseline: run {args.baseline_run} in {other.path} ({len(baseline)} cells)")
    else:
        path = regression.baseline_path(args.baseline, args.baselines_dir)
        meta, baseline = regression.load_baseline(path)
        say(f"baseline: {path} ({meta.get('name')}, {len(baseline)} cells, model {meta.get('model')}, "
            f"created {meta.get('created')})")
    gate = args.gate if args.gate in ("primary", "all") else csv_list(args.gate)
    if args.resamples < 1:
        raise HarnessError("--resamples must be a positive number")
    comp = regression.compare(current, baseline, gate=gate, recovery=args.recovery,
                              recovery_for=dict(args.recovery_for), ci=args.ci, n_resamples=args.resamples,
                              seed=args.seed, min_drop=args.min_drop, allow_model_change=args.allow_model_change)
    say(f"run: {store_path}{f' run {args.run}' if args.run else ''} ({len(current)} cells); paired bootstrap, "
        f"{args.resamples} resamples, seed {args.seed}; recovery >= {args.recovery} x FP\n")
    say(regression.format_comparison(comp, only_gated=args.only_gated))
    _write_json(args, regression.comparison_to_dict(comp))
    return 0 if comp.ok else 1


def _json_to_stdout(args: argparse.Namespace) -> bool:
    return args.json is not None and str(args.json) == "-"


def _write_json(args: argparse.Namespace, data: dict) -> None:
    """--json FILE writes the comparison there; --json - prints it (and nothing else) on stdout."""
    if args.json is None:
        return
    text = json.dumps(_finite(data), indent=1, default=str) + "\n"
    if _json_to_stdout(args):
        print(text, end="")
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text)


def _compare_methods(args: argparse.Namespace, store) -> int:
    from qvlm_harness import paired

    names = csv_list(args.methods)
    if len(names) != 2:
        raise HarnessError(f"--methods takes two methods, A,B (e.g. --methods {plugins.EXAMPLE_PAIR}); "
                           f"got {args.methods!r}")
    metrics = args.metrics if args.metrics in ("primary", "all") else csv_list(args.metrics)
    comp = paired.compare_methods(store, names[0], names[1], run_id=args.run, model=args.model, metrics=metrics,
                                  ci=args.ci, n_resamples=args.resamples, seed=args.seed)
    if not _json_to_stdout(args):
        print(f"store: {store.path}{f' run {args.run}' if args.run else ''}; A = {comp.method_a}, "
              f"B = {comp.method_b}; A - B with its paired bootstrap interval on the same samples\n")
        print(paired.format_method_comparison(comp))
    _write_json(args, paired.method_comparison_to_dict(comp))
    return 0


def _finite(obj: Any) -> Any:
    """NaN/inf -> null: strict JSON readers reject NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
