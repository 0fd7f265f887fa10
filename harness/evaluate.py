"""One cell: the task's requests, answered by the (quantized) model, scored, aggregated and measured into a row.

Per-sample outputs go to the cell's JSONL log batch by batch, so an interrupted cell continues where it stopped;
the row is built from the log (only the samples of this plan), so a resumed cell and a clean one agree.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qvlm_harness.device import PeakDeviceMemory
from qvlm_harness.identity import samples_fingerprint
from qvlm_harness.measure import PeakRSS, weight_bytes
from qvlm_harness.method import QuantizedModel
from qvlm_harness.metrics.intervals import cell_intervals, interval_columns
from qvlm_harness.plan import Cell, Plan
from qvlm_harness.store import ResultRow, SampleLog
from qvlm_harness.task import Sample, aggregate_trials

Log = Callable[[str], None]


def sample_log_path(plan: Plan, cell_id: str) -> Path:
    return plan.spec.output / safe_name(plan.model_id) / "samples" / f"{safe_name(cell_id)}.jsonl"


def evaluate_cell(plan: Plan, cell: Cell, quantized: QuantizedModel, *, run_id: str, fingerprint: str,
                  env: dict[str, Any], progress: bool = False, fidelity: dict | None = None) -> ResultRow:
    """Answer every (trial, sample) of `cell` not yet in its sample log, then build its row from the log."""
    s = plan.spec
    task = plan.tasks[cell.task]
    cid = plan.cell_id(cell)
    samples = plan.samples(cell.task)
    scoring = plan.scoring(cell.task)
    trials = s.trials if cell.shots else 1
    log = SampleLog(sample_log_path(plan, cid))
    with log.lock():  # one writer per cell: a second process on the same cell waits, then finds it done
        done = log.done()
        todo = [(t, x) for t in range(trials) for x in samples if f"{t}:{x.id}" not in done]
        rss_mb, device_mb = _answer(plan, cell, task, quantized, log, todo, trials, scoring, progress)
    ids = {x.id for x in samples}
    entries = [e for e in log.read() if e["id"] in ids]
    method = plan.methods[cell.method]
    return ResultRow(
        cell_id=cid, run_id=run_id, model=plan.model_id, method=cell.method, bits=cell.bits, task=cell.task,
        split=task.resolve_split(s.split), seed=s.seed, n_samples=len(samples), execution=quantized.execution,
        metrics=aggregate_trials(task, entries, trials) | interval_columns(cell_intervals(task, entries, trials)),
        measurements=measurements(entries, quantized, rss_mb, device_mb) | {"fidelity": fidelity},
        search_cost=quantized.search_cost.to_dict(),
        settings={"scope": list(s.scope), "scoring": scoring, "image_control": s.image_control,
                  "trials": trials, "calib_samples": s.calib_samples, "calib_task": plan.calib_source(cell),
                  "spec": cell.spec.to_dict(), "activations": method.computed_spec(cell.spec).activations,
                  "options": _jsonable(method.config.changed()), "rotate": s.rotate,
                  "config": quantized.config, "primary_metric": task.primary_metric,
                  "task_meta": task.metadata().to_dict(),
                  "task_options": s.task_options.get(cell.task, {}), "batch_size": s.batch_size,
                  "quantized_modules": len(quantized.quantized_modules), "report": quantized.report,
                  "samples_log": str(log.path.resolve())},
        environment=env, shots=cell.shots, sample_limit=s.limit, scoring=scoring,
        describe=_describe(method, cell, s.rotate), model_fingerprint=fingerprint,
        data_fingerprint=samples_fingerprint(samples), cell_key=plan.cell_key(cell), identity=plan.identity(cell),
    )


def _describe(method, cell: Cell, rotate: str) -> str:
    """The method's description, and the rotation's when the model was rotated first."""
    text = method.describe(cell.spec)
    if rotate == "none":
        return text
    from qvlm_harness.models.rotation import describe_rotation

    return f"{describe_rotation(rotate)} {text}"


def _answer(plan: Plan, cell: Cell, task, quantized: QuantizedModel, log: SampleLog, todo: list, trials: int,
            scoring: str, progress: bool) -> tuple[float, float | None]:
    """Answer the (trial, sample) pairs in `todo` batch by batch, appending each batch to the log; returns the
    peak RSS while answering and, on CUDA, the allocator's peak (MiB, reset for this cell; None on the CPU)."""
    s = plan.spec
    adapter = quantized.adapter
    samples = plan.samples(cell.task)
    demo_pool = plan.demo_pool(cell.task) if cell.shots else []
    swapped_images = control_images(samples, s.image_control, s.seed)
    total = len(samples) * trials
    bar = tqdm(total=total, initial=total - len(todo), disable=not progress, desc=cell.label, unit="sample",
               leave=False)
    with PeakRSS() as rss, PeakDeviceMemory(getattr(adapter, "device", None)) as device_memory:
        for start in range(0, len(todo), s.batch_size):
            chunk = todo[start:start + s.batch_size]
            demos = [demonstrations(sample, demo_pool, cell.shots, trial, s.seed) for trial, sample in chunk]
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
    return rss.peak_mb, device_memory.peak_mb


def control_images(samples: Sequence[Sample], mode: str | None, seed: int) -> dict[str, Any] | None:
    """For `--image-control shuffle`: each image question gets another question's image (a seeded derangement, so
    no question keeps its own); `blank`: a mid-grey image. None when no control is asked."""
    if mode is None:
        return None
    with_image = [x for x in samples if x.image is not None]
    if mode == "blank":
        from PIL import Image

        grey = Image.new("RGB", (224, 224), (128, 128, 128))
        return {x.id: grey for x in with_image}
    order = list(range(len(with_image)))
    random.Random(f"control-{seed}").shuffle(order)
    # rotate the shuffled order by one: a derangement whenever there are two or more images
    return {with_image[order[i]].id: with_image[order[(i + 1) % len(order)]].image for i in range(len(order))}


def demonstrations(sample: Sample, pool: Sequence[Sample], shots: int, trial: int, seed: int) -> list[Sample]:
    """Demonstrations for one query: seeded by (seed, trial, query id) so they do not depend on batch order or on
    resuming; the query itself is never among them."""
    if not shots:
        return []
    candidates = [d for d in pool if d.id != sample.id]
    rng = random.Random(f"demos-{seed}-{trial}-{sample.id}")
    return rng.sample(candidates, min(shots, len(candidates)))


def measurements(entries: list[dict], quantized: QuantizedModel, peak_rss_mb: float,
                 peak_cuda_mb: float | None = None) -> dict[str, Any]:
    """Latency and memory of a cell, from its sample log and the model it ran on; `peak_cuda_mb` is the CUDA
    allocator's high-water mark while the cell's samples were answered (weights included; None on the CPU)."""
    model = quantized.adapter.model
    prefill = [e["prefill_s"] for e in entries if e.get("prefill_s") is not None]
    decode = sum(e["decode_s"] or 0.0 for e in entries)
    tokens = sum(e["new_tokens"] or 0 for e in entries)
    return {
        "prefill_ms_per_sample": 1000 * statistics.fmean(prefill) if prefill else None,
        "decode_tokens_per_s": tokens / decode if decode > 0 else None,
        "weight_mb_stored": weight_bytes(model, packed=False) / 2**20,
        "weight_mb_packed": weight_bytes(model, packed=True) / 2**20,
        "packed_is_simulated": quantized.execution == "simulated",
        "peak_rss_mb": peak_rss_mb,
        "peak_cuda_mb": peak_cuda_mb,
        "timing": "simulated" if quantized.execution == "simulated" else quantized.execution,
    }


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in name)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
