"""`harness` command line: run | ls | models | report.

Every user error ends in one line on stderr naming the fix, and exit code 2; results already written stay.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness import __version__, plugins
from harness.config import ALL_SCOPES, QuantSpec, RunSpec
from harness.errors import HarnessError

DEFAULT_MODEL_CAVEAT = ("Model: the embedded default (DINOv2-S/14 + SmolLM2-135M-Instruct, trained projector/LoRA); "
                        "its LM weights come from a Q4_1 GGUF, so weight-only 4-bit results are optimistic; "
                        "the embedded data sets are derived from easy-VQA and packaged photos, not the official "
                        "benchmarks.")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise HarnessError(f"expected comma-separated integers, got {text!r} (e.g. --shots 0,4,32)") from None


def _scope(text: str) -> tuple[str, ...]:
    parts = tuple(_csv(text))
    bad = [p for p in parts if p not in ALL_SCOPES]
    if bad or not parts:
        raise HarnessError(f"--quantize takes a comma list of {', '.join(ALL_SCOPES)}; got {text!r}")
    return parts


def _method_options(pairs: Sequence[str]) -> dict[str, dict]:
    """--method-option awq.duo_scaling=true -> {"awq": {"duo_scaling": True}}."""
    out: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot:
            raise HarnessError(f"--method-option takes METHOD.OPTION=VALUE, got {pair!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(plugins.methods.resolve_name(method), {})[option] = parsed
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="harness", description="Benchmark post-training quantization of LVLMs.")
    ap.add_argument("--version", action="version", version=f"qvlm-harness {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evaluate methods x bits x tasks; results go to the store and tables")
    run.add_argument("--methods", required=True, help="comma list, e.g. fp16,rtn (see `harness ls methods`)")
    run.add_argument("--tasks", required=True, help="comma list, e.g. sqa,vqav2 (see `harness ls tasks`)")
    run.add_argument("--bits", default="w8a8,w4a4", help="comma list of WxAy[gG][-tensor][-static][-sym]")
    run.add_argument("--model", default="default", help="'default', a local Llava checkpoint folder or a hub id")
    run.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of N samples per task")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--output", type=Path, default=Path("results"), help="folder for tables, samples, store")
    run.add_argument("--store", type=Path, default=None, help="SQLite store (default: <output>/harness.db)")
    run.add_argument("--data-dir", type=Path, default=None,
                     help="official data: one task's folder, or a folder with one sub-folder per task")
    run.add_argument("--split", default="test", help="'test' means each task's evaluation split")
    run.add_argument("--calib-samples", type=int, default=64)
    run.add_argument("--calib-task", default=None, help="calibrate every cell on this task (default: its own)")
    run.add_argument("--quantize", type=_scope, default=ALL_SCOPES, dest="scope",
                     help="parts to quantize: vision,projector,lm (default all)")
    run.add_argument("--scoring", choices=["generate", "loglik"], default="generate")
    run.add_argument("--max-new-tokens", type=int, default=16)
    run.add_argument("--shots", type=_ints, default=(0,), help="few-shot counts for tasks that take them (hm)")
    run.add_argument("--trials", type=int, default=1, help="seeded few-shot trials averaged per shot count")
    run.add_argument("--device", default="cpu")
    run.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    run.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE")
    run.add_argument("--no-log-samples", action="store_true", help="do not keep prompts in the per-sample logs")
    run.add_argument("--no-progress", action="store_true")

    ls = sub.add_parser("ls", help="list registered methods, tasks or models")
    ls.add_argument("what", choices=["methods", "tasks", "models"])

    models = sub.add_parser("models", help="build or locate models")
    models.add_argument("action", choices=["build-default", "path"])
    models.add_argument("--rebuild", action="store_true")

    report = sub.add_parser("report", help="re-render tables of a stored run (default: the newest)")
    report.add_argument("--run", default=None)
    report.add_argument("--output", type=Path, default=Path("results"))
    report.add_argument("--store", type=Path, default=None)
    return ap


def cmd_run(args: argparse.Namespace) -> int:
    from harness.report import main_table, to_markdown, write_tables
    from harness.runner import Runner

    spec = RunSpec(
        methods=_csv(args.methods), tasks=_csv(args.tasks), bits=QuantSpec.parse_list(args.bits), model=args.model,
        limit=args.limit, seed=args.seed, batch_size=args.batch_size, output=args.output, store=args.store,
        data_dir=args.data_dir, split=args.split, calib_samples=args.calib_samples, calib_task=args.calib_task,
        scope=tuple(args.scope), scoring=args.scoring, max_new_tokens=args.max_new_tokens, shots=args.shots,
        trials=args.trials, device=args.device, threads=args.threads, log_samples=not args.no_log_samples,
        method_options=_method_options(args.method_option),
    )
    if spec.limit is not None and spec.limit <= 0:
        raise HarnessError("--limit must be a positive number of samples")
    t0 = time.time()
    result = Runner(spec, log=lambda m: print(m, file=sys.stderr), progress=not args.no_progress).run()
    folder = spec.output / result.rows[0].model.replace("/", "_") / result.run_id if result.rows else spec.output
    caveat = DEFAULT_MODEL_CAVEAT if spec.model == "default" else None
    write_tables(result.rows, folder, caveat=caveat)
    payload = {"run_id": result.run_id, "spec": {k: str(v) for k, v in vars(spec).items()},
               "rows": [r.__dict__ for r in result.rows]}
    (folder / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(to_markdown(main_table(result.rows)))
    from harness.report import task_table

    for task in dict.fromkeys(r.task for r in result.rows):
        print(f"\n{task}:\n" + to_markdown(task_table(result.rows, task)))
    print("\nsimulated = fake quantization (accuracy is real; latency/memory are the float model's).")
    if caveat:
        print(caveat)
    print(f"\n{result.computed} cells computed, {result.reused} reused from the store; "
          f"{time.time() - t0:.0f}s. Tables: {folder}/ (main.csv/.tex/.md, per task); "
          f"per-sample logs: {spec.output}/<model>/samples/; store: {spec.store_path}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    registry = {"methods": plugins.methods, "tasks": plugins.tasks, "models": plugins.models}[args.what]
    for name in registry.names():
        aliases = registry.aliases_of(name)
        line = f"{name:<14} {registry.summary(name)}"
        if aliases:
            line += f" (aliases: {', '.join(aliases)})"
        if args.what == "tasks":
            task = registry.get(name)
            line += f"\n{'':<14} metrics: {', '.join(task.metrics)}; eval split: {task.eval_split}"
            line += f"\n{'':<14} data: {task.data_layout}"
        print(line)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from harness.models.default import default_model_path

    path = default_model_path(rebuild=args.rebuild)
    print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
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
    folder = args.output / rows[0].model.replace("/", "_") / run_id
    write_tables(rows, folder)
    print(to_markdown(main_table(rows)))
    print(f"\ntables written to {folder}/")
    return 0


COMMANDS = {"run": cmd_run, "ls": cmd_ls, "models": cmd_models, "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished cells are in the store and finished samples in the sample logs; "
              "rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
