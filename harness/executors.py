"""Executors that spread a run's jobs beyond this process. `--executor local` (the default) needs none of this.

`RayExecutor` submits one Ray task per method x bits x task (a quantization group split by task, so calibrated
methods and cheap ones alike parallelise), each requesting `--threads` CPUs (default 1) and one GPU when the
cluster has GPUs and the run's device is not the CPU. Each task runs `qvlm_harness.runner.run_job`: the same code as
the local path, loading its own copy of the model. Finished rows return to the driver, which writes them to the
store as they arrive, so an interrupted cluster run resumes like a local one. Per-sample logs are written by the
workers under `--output`: on a multi-node cluster that folder must be on a shared filesystem (as must the model
and data), and qvlm-harness must be installed on every node (it installs as the package `qvlm_harness`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence

from qvlm_harness.config import RunSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.runner import GroupJob, run_job
from qvlm_harness.store import ResultRow

FORWARDED_ENV = ("QVLM_HARNESS_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


def split_by_task(jobs: Sequence[GroupJob]) -> list[GroupJob]:
    """One job per method x bits x task (x calibration): the unit a cluster schedules."""
    out = []
    for job in jobs:
        for task in dict.fromkeys(c.task for c in job.cells):
            out.append(GroupJob(job.method, job.spec, job.calib_task, tuple(c for c in job.cells if c.task == task)))
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

    def run(self, spec: RunSpec, jobs: Sequence[GroupJob], *, model_id: str, model_path: str,
            run_id: str) -> Iterator[ResultRow]:
        try:
            import ray
        except ImportError:
            raise HarnessError("--executor ray needs Ray: pip install 'qvlm-harness[ray]'") from None
        self._init(ray)
        gpus = self.num_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 and spec.device != "cpu" else 0
        task = ray.remote(num_cpus=spec.threads or 1, num_gpus=gpus, max_retries=0)(run_job)
        units = split_by_task(jobs)
        refs = {task.remote(spec, job, model_id=model_id, model_path=model_path, run_id=run_id, executor="ray"): job
                for job in units}
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
