"""The one way a model is quantized: `quantize(adapter, method, spec, calibration, ...)`.

The runner, `harness bench`, `harness quantize` and the lm-eval model all call it, so what quantizing one model
involves is written once: the support and calibration checks (a method that calibrates never silently runs
without samples), seeding, the cost clock (wall time, peak RSS, the method's stages, and the FP-pass multiple:
one FP forward over the same calibration set timed in the same run), packing onto real kernels, and the
short-circuit for a model that is already a quantized checkpoint (labelled from its manifest, never re-quantized).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.cost import CostRecorder
from qvlm_harness.device import module_device, off_device, sync, timer
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import Method, QuantizedModel, require_calibration
from qvlm_harness.task import Task

Log = Callable[[str], None]


def seed_everything(seed: int) -> None:
    """Seed every generator a method may draw from (Python, NumPy, torch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def calibration_for(method: Method, spec: QuantSpec, task: Task | None, n: int, seed: int,
                    data_dir: Path | None = None) -> CalibrationSet | None:
    """The calibration set `method` needs at `spec` (None when it needs none): `n` seeded train samples of
    `task`. An empty set is refused here, before the model is touched."""
    if not method.needs_calibration(spec):
        return None
    if task is None:
        raise HarnessError(f"{method.name} at {spec.tag} calibrates on a task's train split; name one")
    calibration = CalibrationSet.from_task(task, n, seed, data_dir)
    return require_calibration(method, spec, calibration)


def time_fp_pass(adapter, calibration: CalibrationSet, batch_size: int = 8) -> float:
    """Seconds of one FP forward pass over the calibration set (prompts with target answers), the unit search
    costs are expressed in."""
    with timer(getattr(adapter, "device", None)) as elapsed:  # CUDA events on a GPU, perf_counter on the CPU
        calibration.run(adapter, batch_size=batch_size)
    return elapsed.seconds


def quantize(adapter, method: Method, spec: QuantSpec, calibration: CalibrationSet | None = None, *,
             scope: Sequence[Scope] = ALL_SCOPES, seed: int = 0, execution: str = "simulated",
             kernel_backend: str = "auto", measure_fp_pass: bool = True, log: Log | None = None,
             embeddings: str = "none", rotate: str = "none") -> QuantizedModel:
    """Quantize `adapter.model` in place with `method` at `spec` and return the labelled result.

    `rotate` ("hadamard" | "random") rotates the float model first (QuaRot, `qvlm_harness.models.rotation`;
    seeded by `seed`, timed as the search cost's "rotate" stage, reported under ``report["rotation"]``), so every
    method quantizes the rotated model. `execution="packed"` converts the fake-quant layers to packed integer
    kernels afterwards (the result says "real" when any layer converted; the conversion is not part of the search
    cost). `embeddings` (the ``--quantize-embeddings`` format, `qvlm_harness.kernels.embedding`) also quantizes the
    token embedding and the LM head, whatever the method, after it ran; the result's report says so under
    ``embeddings``."""
    from qvlm_harness.checkpoint import StoredQuantization
    from qvlm_harness.kernels.embedding import check_embeddings, quantize_embeddings

    if isinstance(method, StoredQuantization):  # already quantized: label it from the manifest
        if embeddings != "none":
            raise HarnessError(f"the checkpoint {method.path} fixes its embeddings; drop --quantize-embeddings "
                               "(quantize again with `harness quantize --quantize-embeddings` to change them)")
        if rotate != "none":
            raise HarnessError(f"{method.path} is a stored quantized checkpoint; --rotate applies when quantizing a "
                               "float model (a rotated checkpoint keeps its rotation)")
        qm = method.quantize(adapter, None, spec, scope)
        return pack(qm, kernel_backend, log) if execution == "packed" and qm.execution == "simulated" else qm
    reason = method.supports(spec)
    if reason is not None:
        raise HarnessError(f"method {method.name} does not support {spec.tag} ({reason}); see `harness ls methods`")
    check_embeddings(adapter.model, embeddings)
    needed = method.needs_calibration(spec)
    calibration = require_calibration(method, spec, calibration) if needed else None
    with CostRecorder() as recorder:
        rotation = _rotate(adapter, rotate, seed)
    rotate_s = recorder.cost.seconds
    fp_pass_s = None
    if measure_fp_pass and calibration is not None:
        fp_pass_s = time_fp_pass(adapter, calibration)
    seed_everything(seed)
    device = module_device(adapter.model)
    with CostRecorder() as recorder:
        qm = method.quantize(adapter, calibration, spec, scope)
        sync(device)  # a GPU search's last kernels belong to its cost
    keep_on_device(qm, device, log)
    qm.search_cost = recorder.cost
    if rotation is not None:
        qm.report["rotation"] = rotation
        qm.search_cost.seconds += rotate_s
        qm.search_cost.stages = {"rotate": rotate_s, **(qm.search_cost.stages or {})}
    qm.search_cost.fp_pass_s = fp_pass_s
    if not qm.config:
        qm.config = method.config.to_dict()
    done = quantize_embeddings(adapter.model, embeddings)
    if done is not None:
        qm.report["embeddings"] = done
        if log:
            log(f"  embeddings: {done['format']} ({'tied head, one copy' if done['tied'] else 'embedding and head'})")
    if execution == "packed" and qm.execution == "simulated":
        pack(qm, kernel_backend, log)
    return qm


def keep_on_device(qm: QuantizedModel, device: torch.device | None, log: Log | None = None) -> None:
    """The engine's placement invariant: a quantized model lives where the float model was. A method that left
    tensors elsewhere (a CPU-built buffer on a CUDA model) is corrected here, and the correction is recorded in
    ``report["placement"]`` (the `cuda` tests require it to be absent: every method places its own tensors)."""
    if device is None or device.type == "meta":
        return
    stray = off_device(qm.adapter.model, device)
    if not stray:
        return
    qm.adapter.model.to(device)
    note = f"moved {len(stray)} tensor(s) the method left off {device} (e.g. {stray[0]}) onto it"
    qm.report["placement"] = note
    if log:
        log(f"  {note}")


def _rotate(adapter, rotate: str, seed: int) -> dict | None:
    """Rotate the float model before the method (None for "none")."""
    if rotate == "none":
        return None
    from qvlm_harness.models.rotation import rotate_model

    return rotate_model(adapter, rotate, seed)


def pack(qm: QuantizedModel, backend: str = "auto", log: Log | None = None) -> QuantizedModel:
    """Convert `qm`'s fake-quant layers to packed kernels in place; execution becomes "real" if any converted."""
    from qvlm_harness.kernels.convert import convert_to_packed

    report = convert_to_packed(qm.adapter.model, backend=backend)
    qm.report["packing"] = report.to_dict() | {"summary": report.summary()}
    if report.converted:
        qm.execution = "real"
    if log:
        log(f"  {report.summary()}")
    return qm
