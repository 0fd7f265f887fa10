"""`harness validate`: the plan of a run and every problem found in it, with no model loaded.

Takes the same flags as `harness run`. Prints the cells the run would compute (method, bits, task, shots, what
calibrates them, their cell ids), the notes (duplicates removed, unsupported bit-widths skipped) and every problem,
one line each; exits 2 when there is a problem, 0 when the run would start.
"""

from __future__ import annotations

import argparse
import sys

from qvlm_harness.commands.common import add_run_arguments, run_spec_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check a run's flags, options and data and print its plan (no model load)")
    add_run_arguments(p)


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness.plan import make_plan

    plan = make_plan(run_spec_from_args(args), collect=True)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if plan.problems:
        for problem in plan.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(plan.problems)} problem(s); nothing was run", file=sys.stderr)
        return 2
    print(f"model {plan.model_id}; {len(plan.cells)} cell(s) in {len(plan.jobs())} quantization job(s)")
    for job in plan.jobs():
        method = plan.methods[job.method]
        options = method.config.changed()
        head = f"{job.method} {'fp' if job.spec.is_float else job.spec.tag}"
        if job.spec.quantizes_activations and not method.fixed_precision:
            head += f" (activations {method.computed_spec(job.spec).activations})"
        head += f" [{', '.join(f'{k}={v}' for k, v in options.items())}]" if options else ""
        head += f", calibrated on {plan.spec.calib_samples} {job.calib_task} train samples" if job.calib_task else ""
        print(head)
        for cell in job.cells:
            n = len(plan.samples(cell.task))
            print(f"  {cell.task}{f' {cell.shots}-shot' if cell.shots else ''}: {n} samples, "
                  f"scoring {plan.scoring(cell.task)}, cell {plan.cell_id(cell)}")
    return 0
