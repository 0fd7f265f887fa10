"""The runner: expands a RunSpec into cells, quantizes once per (method, bits[, calibration task]), evaluates
each cell with per-sample resume, measures, and writes every finished cell to the store immediately.

Everything a user can get wrong (names, bits, data folders, model path) is checked before the model is loaded,
so a typo costs a second, not a model load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from qvlm_harness import plugins
from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.checkpoint import StoredQuantization, load_adapter, read_manifest
from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.measure import PeakRSS, environment, weight_bytes
from qvlm_harness.method import Method, QuantizedModel
from qvlm_harness.metrics.intervals import cell_intervals, interval_columns
from qvlm_harness.models.llava import LlavaAdapter, set_threads
from qvlm_harness.store import ResultRow, SampleLog, Store
from qvlm_harness.task import Sample, Task, aggregate_trials

FP_TAG = "fp"


@dataclass(frozen=True)
class Cell:
    """One result: a method at one precision on one task (with one shot count)."""

    method: str
    spec: QuantSpec
    task: str
    shots: int = 0

    @property
    def bits(self) -> str:
        return FP_TAG if self.spec.is_float else self.spec.tag


@dataclass
class RunResult:
    run_id: str
    rows: list[ResultRow] = field(default_factory=list)
    computed: int = 0
    reused: int = 0
    results_json: Path | None = None


def resolve_model(name: str) -> tuple[str, str]:
    """(model id used in the store, path or hub id to load)."""
    if name in plugins.models:
        target = plugins.models.get(name)
        path = str(target() if callable(target) else target)
        return f"{name}@{Path(path).name}" if name == "default" else name, path
    return name, name


def check_model_source(name: str) -> None:
    """Fail fast on a local path that cannot be a checkpoint (hub ids are checked when loaded)."""
    if name in plugins.models:
        return
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        raise HarnessError(f"model path {path} does not exist; pass a Llava checkpoint folder, a hub id such as "
                           "llava-hf/llava-1.5-7b-hf, or --model default")
    if path.exists() and not (path / "config.json").is_file():
        raise HarnessError(f"{path} is not a model folder (no config.json); pass a Llava checkpoint folder")


@dataclass(frozen=True)
class GroupJob:
    """One unit of work: quantize a fresh model for (method, spec, calibration task), then evaluate `cells`."""

    method: str
    spec: QuantSpec
    calib_task: str | None
    cells: tuple[Cell, ...]


class Executor(Protocol):
    """Runs jobs somewhere else (e.g. `qvlm_harness.executors.RayExecutor`) and yields finished rows; the runner stores
    them. The local path does not go through an executor."""

    def run(self, spec: RunSpec, jobs: Sequence[GroupJob], *, model_id: str, model_path: str,
            run_id: str) -> Iterator[ResultRow]: ...


def run_job(spec: RunSpec, job: GroupJob, *, model_id: str, model_path: str, run_id: str,
            executor: str = "remote") -> list[ResultRow]:
    """A job on its own: what a Ray task runs. Validates the spec, loads the model, quantizes and evaluates, with
    the same seeding as the local path; the environment recorded is the worker's."""
    runner = Runner(spec, log=lambda m: print(m, file=sys.stderr), progress=False)
    runner.plan()
    threads = set_threads(spec.threads)
    torch.manual_seed(spec.seed)
    env = environment(spec.device) | {"threads": threads, "executor": executor}
    base = load_adapter(model_path, dtype=spec.dtype, device=spec.device, name=model_id)
    return list(runner.run_group(job, base, model_id, base.fingerprint(), run_id, env))


class Runner:
    def __init__(self, spec: RunSpec, *, log: Callable[[str], None] = print, progress: bool = True,
                 executor: Executor | None = None):
        self.spec = spec
        self.executor = executor
        self.log = log
        self.progress = progress
        self.methods: dict[str, Method] = {}
        self.tasks: dict[str, Task] = {}
        self._samples: dict[tuple[str, str], list[Sample]] = {}

    # -- planning ------------------------------------------------------------------------------------------------
    def plan(self) -> list[Cell]:
        """Validate the run and list its cells (no model is loaded here)."""
        s = self.spec
        task_names = [plugins.tasks.resolve_name(t) for t in s.tasks]
        manifest = read_manifest(s.model) if Path(str(s.model)).expanduser().is_dir() else None
        if manifest is not None:  # an already quantized checkpoint: evaluate it as stored
            if s.methods:
                raise HarnessError(f"{s.model} is a quantized checkpoint ({manifest['method']} "
                                   f"{manifest['spec']['tag']}); evaluate it with `harness eval --model {s.model}` "
                                   "(no --methods)")
            stored = StoredQuantization(manifest, str(s.model))
            method_names = [stored.name]
            self.methods[stored.name] = stored
            s.bits = [stored.spec]
        else:
            method_names = [plugins.methods.resolve_name(m) for m in s.methods]
        if not method_names:
            raise HarnessError("no methods given; e.g. --methods fp16,rtn (see `harness ls methods`)")
        if not task_names:
            raise HarnessError("no tasks given; e.g. --tasks sqa (see `harness ls tasks`)")
        for m in method_names:
            if m not in self.methods:
                self.methods[m] = plugins.methods.get(m)(**s.method_options.get(m, {}))
        for t in task_names:
            self.tasks[t] = self._make_task(t)
        if s.calib_task is not None:
            plugins.tasks.resolve_name(s.calib_task)
        check_model_source(s.model)
        cells: list[Cell] = []
        for m in method_names:
            method = self.methods[m]
            specs = [QuantSpec()] if method.fixed_precision else list(s.bits)
            for spec in specs:
                if not method.supports(spec):
                    reason = getattr(method, "unsupported_reason", lambda _s: None)(spec)
                    message = f"method {m} does not support {spec.tag}" + (f" ({reason})" if reason else "")
                    if len(method_names) * len(specs) == 1:
                        raise HarnessError(f"{message}; see `harness ls methods`")
                    self.log(f"skipping: {message}")
                    continue
                for t in task_names:
                    task = self.tasks[t]
                    shots = s.shots if task.supports_shots else (0,)
                    if s.scoring not in task.scoring_modes and len(task.scoring_modes) > 1:
                        raise HarnessError(f"task {t} cannot score by {s.scoring!r}; use one of "
                                           f"{', '.join(task.scoring_modes)}")
                    cells += [Cell(m, spec, t, k) for k in shots]
        if not cells:
            raise HarnessError("no method supports any of the requested bit-widths; see `harness ls methods`")
        for t in task_names:  # data problems surface now, before any model is loaded
            self.samples(t)
            if any(c.shots for c in cells if c.task == t):
                self.tasks[t].load(self.tasks[t].train_split, self._data_dir(t))
        return cells

    def _make_task(self, name: str) -> Task:
        return plugins.tasks.get(name)(**self.spec.task_options.get(plugins.tasks.resolve_name(name), {}))

    def _data_dir(self, task: str) -> Path | None:
        d = self.spec.data_dir
        if d is None:
            return None
        sub = Path(d) / task
        return sub if sub.is_dir() else Path(d)

    def samples(self, task: str) -> list[Sample]:
        """The evaluation samples of a task, limited by a seeded subset (same subset for every method)."""
        key = (task, self.spec.split)
        if key not in self._samples:
            all_samples = self.tasks[task].load(self.spec.split, self._data_dir(task))
            if not all_samples:
                raise HarnessError(f"task {task}: split {self.spec.split!r} is empty")
            if self.spec.limit is not None and self.spec.limit < len(all_samples):
                keep = set(random.Random(f"limit-{self.spec.seed}").sample(range(len(all_samples)), self.spec.limit))
                all_samples = [x for i, x in enumerate(all_samples) if i in keep]
            self._samples[key] = all_samples
        return self._samples[key]

    def cell_id(self, cell: Cell, model_id: str) -> str:
        s = self.spec
        method = self.methods[cell.method]
        settings = {
            "model": model_id, "method": cell.method, "bits": cell.bits, "task": cell.task, "split": s.split,
            "shots": cell.shots, "trials": s.trials if cell.shots else 1, "seed": s.seed, "limit": s.limit,
            "scoring": self._scoring(cell.task), "max_new_tokens": s.max_new_tokens,
            "data_dir": str(s.data_dir) if s.data_dir else None,
        }
        if s.dtype != "fp32":
            settings["dtype"] = s.dtype
        if s.image_control:
            settings["image_control"] = s.image_control
        if not method.fixed_precision:
            settings |= {"scope": sorted(s.scope), "options": s.method_options.get(cell.method, {}),
                         "calib": self._calib_source(cell, method), "calib_samples": s.calib_samples}
            if s.execution != "simulated":  # only when set, so simulated cells keep their existing ids
                settings["execution"] = s.execution
        if s.task_options.get(cell.task):  # only when given, so existing cell ids stay valid
            settings["task_options"] = s.task_options[cell.task]
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"{cell.method}-{cell.bits}-{cell.task}{f'-{cell.shots}shot' if cell.shots else ''}-{digest}"

    def _scoring(self, task: str) -> str:
        modes = self.tasks[task].scoring_modes
        return self.spec.scoring if self.spec.scoring in modes else modes[0]

    def _calib_source(self, cell: Cell, method: Method) -> str | None:
        if not method.needs_calibration(cell.spec):
            return None
        return self.spec.calib_task or cell.task

    # -- execution -------------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cells = self.plan()
        threads = set_threads(self.spec.threads)
        torch.manual_seed(self.spec.seed)
        model_id, model_path = resolve_model(self.spec.model)
        store = Store(self.spec.store_path)
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + hashlib.sha1(repr(self.spec).encode()).hexdigest()[:6]
        result = RunResult(run_id)
        pending = [c for c in cells if not store.has(self.cell_id(c, model_id))]
        done_before = len(cells) - len(pending)
        self.log(f"run {run_id}: {len(cells)} cells ({done_before} already in {self.spec.store_path}, "
                 f"{len(pending)} to compute); model {model_id}; {threads} threads")
        env = environment(self.spec.device) | {"threads": threads, "executor": "local"}
        if self.executor is not None:  # e.g. Ray: jobs quantize and evaluate on workers; rows come back here
            by_method = {m: [c for c in pending if c.method == m] for m in dict.fromkeys(c.method for c in pending)}
            jobs = [GroupJob(m, spec, calib, tuple(group)) for m, method_cells in by_method.items()
                    for (spec, calib), group in self._quantization_groups(method_cells).items()]
            for row in self.executor.run(self.spec, jobs, model_id=model_id, model_path=model_path, run_id=run_id):
                self._store_row(store, row, result)
            pending = []
        for method_name in dict.fromkeys(c.method for c in pending):
            method_cells = [c for c in pending if c.method == method_name]
            base = load_adapter(model_path, dtype=self.spec.dtype, device=self.spec.device, name=model_id)
            fingerprint = base.fingerprint()
            groups = self._quantization_groups(method_cells)
            for i, ((spec, calib_task), group) in enumerate(groups.items()):
                last = i == len(groups) - 1
                adapter = base if last else LlavaAdapter(copy.deepcopy(base.model), base.processor, base.name,
                                                         base.path)
                job = GroupJob(method_name, spec, calib_task, tuple(group))
                for row in self.run_group(job, adapter, model_id, fingerprint, run_id, env):
                    self._store_row(store, row, result)
                del adapter
            del base
        ids = [self.cell_id(c, model_id) for c in cells]
        rows = {r.cell_id: r for r in store.rows(cell_ids=ids)}
        result.rows = [rows[i] for i in ids if i in rows]
        result.reused = done_before
        return result

    def run_group(self, job: GroupJob, adapter: LlavaAdapter, model_id: str, fingerprint: str, run_id: str,
                  env: dict) -> Iterator[ResultRow]:
        """The unit of work: quantize `adapter` in place for (method, bits, calibration), then evaluate each cell,
        yielding its row the moment it is finished. Local runs call it per group; a Ray task calls it through
        `run_job`."""
        quantized = self._quantize(self.methods[job.method], adapter, job.spec, job.calib_task)
        for cell in job.cells:
            yield self._evaluate(cell, quantized, model_id, fingerprint, run_id, env)

    def _store_row(self, store: Store, row: ResultRow, result: RunResult) -> None:
        store.put(row)
        result.computed += 1
        self.log(f"  done {row.method} {row.bits} {row.task}{f' {row.shots}-shot' if row.shots else ''}: "
                 + ", ".join(f"{k}={v:.2f}" for k, v in list(row.metrics.items())[:4] if isinstance(v, int | float)))

    def _quantization_groups(self, cells: Sequence[Cell]) -> dict[tuple[QuantSpec, str | None], list[Cell]]:
        groups: dict[tuple[QuantSpec, str | None], list[Cell]] = {}
        for c in cells:
            key = (c.spec, self._calib_source(c, self.methods[c.method]))
            groups.setdefault(key, []).append(c)
        return groups

    def _quantize(self, method: Method, adapter: LlavaAdapter, spec: QuantSpec, calib_task: str | None):
        calibration = None
        if calib_task is not None:
            task = self.tasks.get(calib_task) or self._make_task(calib_task)
            calibration = CalibrationSet.from_task(task, self.spec.calib_samples, self.spec.seed,
                                                   self._data_dir(calib_task))
        label = "fp" if spec.is_float else spec.tag
        self.log(f"quantizing: {method.name} {label}"
                 + (f" (calibration: {len(calibration)} {calib_task} train samples)" if calibration else ""))
        torch.manual_seed(self.spec.seed)
        quantized = method.quantize(adapter, calibration, spec, self.spec.scope)
        if self.spec.execution == "packed" and quantized.execution == "simulated":
            self._pack(quantized)
        return quantized

    def _pack(self, quantized: QuantizedModel) -> None:
        """Convert the fake-quant layers to real packed kernels; execution becomes "real" if any converted."""
        from qvlm_harness.kernels.convert import convert_to_packed

        report = convert_to_packed(quantized.adapter.model)
        quantized.report["packing"] = report.to_dict()
        if report.converted:
            quantized.execution = "real"
        self.log(f"  {report.summary()}")

    def _evaluate(self, cell: Cell, quantized: QuantizedModel, model_id: str, fingerprint: str, run_id: str,
                  env: dict) -> ResultRow:
        s = self.spec
        task = self.tasks[cell.task]
        adapter = quantized.adapter
        cid = self.cell_id(cell, model_id)
        samples = self.samples(cell.task)
        scoring = self._scoring(cell.task)
        trials = s.trials if cell.shots else 1
        demo_pool = task.load(task.train_split, self._data_dir(cell.task)) if cell.shots else []
        swapped_images = self._control_images(samples)
        log = SampleLog(s.output / _safe(model_id) / "samples" / f"{_safe(cid)}.jsonl")
        done = log.done()
        todo = [(t, x) for t in range(trials) for x in samples if f"{t}:{x.id}" not in done]
        bar = tqdm(total=len(samples) * trials, initial=len(samples) * trials - len(todo), disable=not self.progress,
                   desc=f"{cell.method} {cell.bits} {cell.task}{f' {cell.shots}-shot' if cell.shots else ''}",
                   unit="sample", leave=False)
        with PeakRSS() as rss:
            for start in range(0, len(todo), s.batch_size):
                chunk = todo[start:start + s.batch_size]
                demos = [self._demos(task, sample, demo_pool, cell.shots, trial) for trial, sample in chunk]
                requests = []
                for (_, sample), sample_demos in zip(chunk, demos, strict=True):
                    req = task.request(sample, scoring=scoring, demos=sample_demos)
                    if swapped_images is not None and req.image is not None:
                        req.image = swapped_images[sample.id]
                    if req.kind == "generate":
                        req.max_new_tokens = s.max_new_tokens
                    requests.append(req)
                responses = task.answer(adapter, requests, batch_size=s.batch_size)
                lines = []
                for (trial, sample), req, resp, sample_demos in zip(chunk, requests, responses, demos, strict=True):
                    lines.append({"key": f"{trial}:{sample.id}", "trial": trial, "id": sample.id,
                                  "prompt": req.prompt if s.log_samples else None,
                                  "record": task.score(sample, resp), "prefill_s": resp.prefill_s,
                                  "decode_s": resp.decode_s, "new_tokens": resp.new_tokens,
                                  "demos": [d.id for d in sample_demos]})
                log.append(lines)
                bar.update(len(chunk))
        bar.close()
        entries = [e for e in log.read() if e["id"] in {x.id for x in samples}]
        metrics = self._aggregate(task, entries, trials)
        metrics |= interval_columns(cell_intervals(task, entries, trials))  # <metric>_ci_lo/_ci_hi, 95%
        measurements = self._measurements(entries, adapter, quantized, rss.peak_mb)
        method = self.methods[cell.method]
        return ResultRow(
            cell_id=cid, run_id=run_id, model=model_id, method=cell.method, bits=cell.bits, task=cell.task,
            split=task.resolve_split(s.split), seed=s.seed, n_samples=len(samples), execution=quantized.execution,
            metrics=metrics, measurements=measurements,
            search_cost={"seconds": quantized.search_cost.seconds, "peak_rss_mb": quantized.search_cost.peak_rss_mb,
                         "stages": quantized.search_cost.stages},
            settings={"scope": list(s.scope), "scoring": scoring, "image_control": s.image_control,
                      "trials": trials, "calib_samples": s.calib_samples,
                      "calib_task": self._calib_source(cell, method), "spec": cell.spec.to_dict(),
                      "options": s.method_options.get(cell.method, {}), "primary_metric": task.primary_metric,
                      "task_options": s.task_options.get(cell.task, {}),
                      "quantized_modules": len(quantized.quantized_modules), "report": quantized.report,
                      "samples_log": str(log.path.resolve())},
            environment=env, shots=cell.shots, sample_limit=s.limit, scoring=scoring,
            describe=method.describe(cell.spec), model_fingerprint=fingerprint,
            data_fingerprint=_data_fingerprint(samples),
        )

    def _control_images(self, samples: Sequence[Sample]) -> dict[str, Any] | None:
        """For `--image-control shuffle`: each image question gets another question's image (a seeded
        derangement, so no question keeps its own); `blank`: a mid-grey image. None when no control is asked."""
        mode = self.spec.image_control
        if mode is None:
            return None
        with_image = [x for x in samples if x.image is not None]
        if mode == "blank":
            from PIL import Image

            grey = Image.new("RGB", (224, 224), (128, 128, 128))
            return {x.id: grey for x in with_image}
        order = list(range(len(with_image)))
        random.Random(f"control-{self.spec.seed}").shuffle(order)
        # rotate the shuffled order by one: a derangement whenever there are two or more images
        return {with_image[order[i]].id: with_image[order[(i + 1) % len(order)]].image for i in range(len(order))}

    def _demos(self, task: Task, sample: Sample, pool: Sequence[Sample], shots: int, trial: int) -> list[Sample]:
        """Demonstrations for one query: seeded by (seed, trial, query id) so they do not depend on batch order
        or on resuming; the query itself is never among them."""
        if not shots:
            return []
        candidates = [d for d in pool if d.id != sample.id]
        rng = random.Random(f"demos-{self.spec.seed}-{trial}-{sample.id}")
        return rng.sample(candidates, min(shots, len(candidates)))

    _aggregate = staticmethod(aggregate_trials)

    @staticmethod
    def _measurements(entries: list[dict], adapter: LlavaAdapter, quantized: QuantizedModel,
                      peak_rss_mb: float) -> dict[str, Any]:
        prefill = [e["prefill_s"] for e in entries if e.get("prefill_s") is not None]
        decode = sum(e["decode_s"] or 0.0 for e in entries)
        tokens = sum(e["new_tokens"] or 0 for e in entries)
        stored = weight_bytes(adapter.model, packed=False)
        packed = weight_bytes(adapter.model, packed=True)
        return {
            "prefill_ms_per_sample": 1000 * statistics.fmean(prefill) if prefill else None,
            "decode_tokens_per_s": tokens / decode if decode > 0 else None,
            "weight_mb_stored": stored / 2**20,
            "weight_mb_packed": packed / 2**20,
            "packed_is_simulated": quantized.execution == "simulated",
            "peak_rss_mb": peak_rss_mb,
            "timing": "simulated" if quantized.execution == "simulated" else quantized.execution,
        }


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in name)


def _data_fingerprint(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.id.encode())
        h.update(json.dumps(s.data, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
