"""Where a run's quantization jobs execute: in this process (`LocalExecutor`, the default) or on a Ray cluster
(`RayExecutor`). Both implement one protocol, `run(plan, jobs, run_id=...) -> Iterator[ResultRow]`, and both run
each job through `run_group`: quantize a fresh model for (method, bits, calibration task) with the one quantize
entry point, then evaluate the job's cells, yielding each row the moment it is finished. The runner stores rows
as they arrive, so an interrupted run resumes alike wherever its jobs ran.

`RayExecutor` submits one Ray task per method x bits x task (a job split by task, so calibrated methods and cheap
ones alike parallelise), each requesting `--threads` CPUs (default 1) and one GPU when the cluster has GPUs and
the run's device is not the CPU. Each task runs `run_job`, which re-plans the run on the worker (same checks,
same seeding) and loads its own copy of the model. Per-sample logs are written by the workers under `--output`:
on a multi-node cluster that folder must be on a shared filesystem (as must the model and data), and
qvlm-harness must be installed on every node (it installs as the package `qvlm_harness`).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from qvlm_harness import fidelity
from qvlm_harness.checkpoint import StoredQuantization, load_adapter
from qvlm_harness.config import RunSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.evaluate import evaluate_cell
from qvlm_harness.measure import environment
from qvlm_harness.models.llava import LlavaAdapter, set_threads
from qvlm_harness.plan import Plan, QuantJob, make_plan
from qvlm_harness.quantize import calibration_for, quantize
from qvlm_harness.store import ResultRow

FORWARDED_ENV = ("QVLM_HARNESS_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
Log = Callable[[str], None]
# KL (nats per position) a replay of function-preserving transforms may show against the FP model: float rounding
# and the float16 storage of the reference give ~1e-5; a mishandled fold gives whole nats
TRANSFORM_KL_TOLERANCE = 1e-3


class Executor(Protocol):
    """Runs a plan's jobs and yields finished rows; the runner stores them."""

    def run(self, plan: Plan, jobs: Sequence[QuantJob], *, run_id: str) -> Iterator[ResultRow]: ...


def run_group(plan: Plan, job: QuantJob, adapter: LlavaAdapter, *, fingerprint: str, run_id: str, env: dict,
              log: Log = lambda _m: None, progress: bool = False) -> Iterator[ResultRow]:
    """The unit of work: quantize `adapter` in place for (method, bits, calibration task), then evaluate each of
    the job's cells, yielding its row as soon as it is finished."""
    s = plan.spec
    method = plan.methods[job.method]
    calib_task = plan.task(job.calib_task) if job.calib_task else None
    calibration = calibration_for(method, job.spec, calib_task, s.calib_samples, s.seed,
                                  plan.data_dir(job.calib_task) if job.calib_task else None)
    label = "fp" if job.spec.is_float else job.spec.tag
    probes = ref = None
    if not isinstance(method, StoredQuantization):  # a stored checkpoint has no FP model in this run
        task = plan.tasks[job.cells[0].task]
        probes = fidelity.probe_requests([task.request(x, scoring="generate") for x in
                                          plan.samples(job.cells[0].task)[:fidelity.PROBES]])
        ref = fidelity.reference(adapter, probes)
    log(f"quantizing: {method.name} {label}"
        + (f" (calibration: {len(calibration)} {job.calib_task} train samples)" if calibration else ""))
    quantized = quantize(adapter, method, job.spec, calibration, scope=s.scope, seed=s.seed, execution=s.execution,
                         log=log, embeddings=s.embeddings, rotate=s.rotate)
    fid = fidelity.compare(quantized.adapter, probes, ref) if ref is not None else None
    if fid is not None:
        log(f"  fidelity to FP on {fid['prompts']} prompts: KL {fid['kl_mean']:.4f} nats/token, top-1 agreement "
            f"{fid['top1_agree']:.1f}%")
    if ref is not None and quantized.adapter.transforms:
        fid = (fid or {}) | {"transforms_alone": check_transforms(plan, quantized, probes, ref)}
    for cell in job.cells:
        yield evaluate_cell(plan, cell, quantized, run_id=run_id, fingerprint=fingerprint, env=env,
                            progress=progress, fidelity=fid)


def check_transforms(plan: Plan, quantized, probes, ref) -> dict:
    """Replay the method's recorded function-preserving transforms (folded scales, rotations) alone on a fresh
    FP model and compare it with the FP model on the fidelity probes: a method whose transforms by themselves change
    the FP outputs (e.g. a fold that mishandles a norm kind) is refused, whatever its accuracy looks like."""
    from qvlm_harness.models.transforms import replay_transforms

    s = plan.spec
    fresh = load_adapter(plan.model_path, dtype=s.dtype, device=s.device, name=plan.model_id)
    replay_transforms(quantized.adapter.transforms, fresh)
    alone = fidelity.compare(fresh, probes, ref)
    del fresh
    if not alone["kl_mean"] <= TRANSFORM_KL_TOLERANCE:
        raise HarnessError(f"{quantized.method} {quantized.spec.tag}: its {len(quantized.adapter.transforms)} "
                           f"transform(s) alone, with every quantizer bypassed, move the FP model's next-token "
                           f"distribution by KL {alone['kl_mean']:.3g} nats (tolerance {TRANSFORM_KL_TOLERANCE:g}); "
                           "refusing its cells: the method mishandles this architecture")
    return {"ops": len(quantized.adapter.transforms), "kl_mean": alone["kl_mean"],
            "top1_agree": alone["top1_agree"]}


def run_job(spec: RunSpec, job: QuantJob, *, model_id: str, model_path: str, run_id: str,
            executor: str = "remote") -> list[ResultRow]:
    """A job on its own: what a Ray task runs. Plans the run (the same checks), loads the model, quantizes and
    evaluates with the same seeding as the local path; the environment recorded is the worker's."""
    plan = make_plan(spec)
    if plan.model_id != model_id:
        raise HarnessError(f"worker resolved the model to {plan.model_id}, the driver to {model_id}")
    threads = set_threads(spec.threads)
    torch.manual_seed(spec.seed)
    env = environment(spec.device) | {"threads": threads, "executor": executor}
    base = load_adapter(model_path, dtype=spec.dtype, device=spec.device, name=model_id,
                        packed=spec.execution == "packed")
    return list(run_group(plan, job, base, fingerprint=base.fingerprint(), run_id=run_id, env=env,
                          log=lambda m: print(m, file=sys.stderr)))


class LocalExecutor:
    """Runs the jobs in this process: one model load per method, a copy of it per job but the last."""

    def __init__(self, log: Log = print, progress: bool = True):
        self.log = log
        self.progress = progress

    def run(self, plan: Plan, jobs: Sequence[QuantJob], *, run_id: str) -> Iterator[ResultRow]:
        s = plan.spec
        env = environment(s.device) | {"threads": torch.get_num_threads(), "executor": "local"}
        for method in dict.fromkeys(j.method for j in jobs):
            mine = [j for j in jobs if j.method == method]
            base = load_adapter(plan.model_path, dtype=s.dtype, device=s.device, name=plan.model_id,
                                packed=s.execution == "packed")
            fingerprint = base.fingerprint()
            for i, job in enumerate(mine):
                adapter = base if i == len(mine) - 1 else LlavaAdapter(copy.deepcopy(base.model), base.processor,
                                                                       base.name, base.path)
                yield from run_group(plan, job, adapter, fingerprint=fingerprint, run_id=run_id, env=env,
                                     log=self.log, progress=self.progress)
                del adapter
            del base


def split_by_task(jobs: Sequence[QuantJob]) -> list[QuantJob]:
    """One job per method x bits x task (x calibration): the unit a cluster schedules."""
    out = []
    for job in jobs:
        for task in dict.fromkeys(c.task for c in job.cells):
            out.append(QuantJob(job.method, job.spec, job.calib_task, tuple(c for c in job.cells if c.task == task)))
    return out


class RayExecutor:
    """Run jobs as Ray tasks on the cluster at `address` ("auto", "ray://host:10001", ...) or, with no address,
    on a Ray instance started on this machine for the run."""

    def __init__(self, address: str | None = None, *, num_gpus: float | None = None, local_cpus: int | None = None):
        self.address = address
        self.num_gpus = num_gpus
        self.local_cpus = local_cpus
        self._started = False

    def _init(self, ray) -> None:
        if ray.is_initialized():
            return
        self._started = True
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        kwargs = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": True}
        if self.address is None:
            kwargs |= {"num_cpus": self.local_cpus or os.cpu_count() or 1, "object_store_memory": 200 * 2**20}
        try:
            ray.init(address=self.address, **kwargs)
        except ConnectionError as exc:
            raise HarnessError(f"cannot reach a Ray cluster at {self.address!r} ({exc}); start one with "
                               "`ray start --head` or omit --address to start a local instance") from None

    def run(self, plan: Plan, jobs: Sequence[QuantJob], *, run_id: str) -> Iterator[ResultRow]:
        try:
            import ray
        except ImportError:
            raise HarnessError("--executor ray needs Ray: pip install 'qvlm-harness[ray]'") from None
        spec = plan.spec
        self._init(ray)
        gpus = self.num_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 and spec.device != "cpu" else 0
        task = ray.remote(num_cpus=spec.threads or 1, num_gpus=gpus, max_retries=0)(run_job)
        units = split_by_task(jobs)
        refs = {task.remote(spec, job, model_id=plan.model_id, model_path=plan.model_path, run_id=run_id,
                            executor="ray"): job for job in units}
        print(f"ray: {len(units)} jobs submitted ({spec.threads or 1} CPU, {gpus} GPU each) to "
              f"{self.address or 'a local instance'}", file=sys.stderr)
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    refs.pop(ref)
                    try:
                        rows = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, HarnessError):
                            raise cause from None
                        raise
                    yield from rows
        finally:
            for ref in refs:  # interrupted or failed: do not leave jobs running on the cluster
                ray.cancel(ref, force=True)
            if self._started:  # the instance this run started (a cluster given by --address stays up)
                ray.shutdown()
                self._started = False
