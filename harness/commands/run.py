"""`harness run`: evaluate methods x bits x tasks; every finished cell goes to the store at once."""

from __future__ import annotations

import argparse
import json
import sys
import time

from qvlm_harness.commands.common import DEFAULT_MODEL_CAVEAT, add_run_arguments, run_folder, run_spec_from_args
from qvlm_harness.errors import HarnessError


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="evaluate methods x bits x tasks; results go to the store and tables")
    add_run_arguments(p)
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where jobs run: this process (default) or a Ray cluster (one job per method x bits x task)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. auto, ray://head:10001); default: start a local Ray instance")


def execute(args: argparse.Namespace) -> int:
    return execute_spec(run_spec_from_args(args), args)


def execute_spec(spec, args: argparse.Namespace) -> int:
    """Run a RunSpec and print/write its tables (shared by `run` and `eval`)."""
    from qvlm_harness.report import SIMULATED_NOTE, main_table, task_table, to_markdown, write_tables
    from qvlm_harness.runner import Runner
    from qvlm_harness.store import clean_json

    executor = None
    if getattr(args, "executor", "local") == "ray":  # `eval` shares this function and has no executor flags
        from qvlm_harness.executors import RayExecutor

        executor = RayExecutor(args.address)
    elif getattr(args, "address", None):
        raise HarnessError("--address is for --executor ray; add --executor ray or drop --address")
    t0 = time.time()
    result = Runner(spec, log=lambda m: print(m, file=sys.stderr), progress=not args.no_progress,
                    executor=executor).run()
    folder = run_folder(spec.output, result.rows[0].model, result.run_id) if result.rows else spec.output
    caveat = DEFAULT_MODEL_CAVEAT if spec.model == "default" else None
    write_tables(result.rows, folder, caveat=caveat)
    payload = {"run_id": result.run_id, "spec": {k: str(v) for k, v in vars(spec).items()},
               "rows": [r.__dict__ for r in result.rows]}
    (folder / "results.json").write_text(json.dumps(clean_json(payload), indent=1, default=str, allow_nan=False)
                                         + "\n")
    print(to_markdown(main_table(result.rows)))
    for task in dict.fromkeys(r.task for r in result.rows):
        print(f"\n{task}:\n" + to_markdown(task_table(result.rows, task)))
    print(f"\n{SIMULATED_NOTE}")
    if caveat:
        print(caveat)
    print(f"\n{result.computed} cells computed, {result.reused} reused from the store; {time.time() - t0:.0f}s. "
          f"Tables: {folder}/ (main and per task, as .csv/.tex/.md); per-sample logs: "
          f"{spec.output}/<model>/samples/; store: {spec.store_path}")
    return 0
