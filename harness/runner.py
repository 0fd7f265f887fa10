"""The runner: plans a run (`qvlm_harness.plan`), skips the cells already in the store, hands the rest to an
executor (this process by default, or Ray) as quantization jobs, and writes every finished row to the store the
moment it arrives, so a run killed at any point keeps every finished cell (and the sample logs keep every
finished sample of an unfinished one).

Everything a user can get wrong is checked by the planner before any model is loaded.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qvlm_harness.config import RunSpec
from qvlm_harness.executors import Executor, LocalExecutor, run_group, run_job
from qvlm_harness.models.llava import set_threads
from qvlm_harness.plan import Cell, Plan, QuantJob, check_model_source, make_plan, resolve_model
from qvlm_harness.store import ResultRow, Store

GroupJob = QuantJob  # the name executors and plugins used before the planner split

__all__ = ["Cell", "GroupJob", "Plan", "QuantJob", "RunResult", "Runner", "check_model_source", "resolve_model",
           "run_group", "run_job"]


@dataclass
class RunResult:
    run_id: str
    rows: list[ResultRow] = field(default_factory=list)
    computed: int = 0
    reused: int = 0


class Runner:
    def __init__(self, spec: RunSpec, *, log: Callable[[str], None] = print, progress: bool = True,
                 executor: Executor | None = None):
        self.spec = spec
        self.executor = executor
        self.log = log
        self.progress = progress
        self._plan: Plan | None = None

    @property
    def planned(self) -> Plan:
        if self._plan is None:
            self._plan = make_plan(self.spec)
            for note in self._plan.notes:
                self.log(note)
        return self._plan

    def plan(self) -> list[Cell]:
        """Validate the run and list its cells (no model is loaded here)."""
        return list(self.planned.cells)

    @property
    def tasks(self):
        return self.planned.tasks

    @property
    def methods(self):
        return self.planned.methods

    def cell_id(self, cell: Cell) -> str:
        return self.planned.cell_id(cell)

    def run(self) -> RunResult:
        plan = self.planned
        threads = set_threads(self.spec.threads)
        torch.manual_seed(self.spec.seed)
        store = Store(self.spec.store_path)
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + hashlib.sha1(repr(self.spec).encode()).hexdigest()[:6]
        result = RunResult(run_id)
        ids = {c: plan.cell_id(c) for c in plan.cells}
        pending = [c for c in plan.cells if not store.has(ids[c])]
        result.reused = len(plan.cells) - len(pending)
        self.log(f"run {run_id}: {len(plan.cells)} cells ({result.reused} already in {self.spec.store_path}, "
                 f"{len(pending)} to compute); model {plan.model_id}; {threads} threads")
        executor = self.executor or LocalExecutor(self.log, self.progress)
        if pending:
            for row in executor.run(plan, plan.jobs(pending), run_id=run_id):
                store.put(row)
                result.computed += 1
                self.log(f"  done {row.method} {row.bits} {row.task}{f' {row.shots}-shot' if row.shots else ''}: "
                         + ", ".join(f"{k}={v:.2f}" for k, v in list(row.metrics.items())[:4]
                                     if isinstance(v, int | float)))
        rows = {r.cell_id: r for r in store.rows(cell_ids=list(ids.values()))}
        result.rows = [rows[i] for i in ids.values() if i in rows]
        return result
