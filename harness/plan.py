"""The planner: a `RunSpec` becomes the run's cells, its quantization jobs and every problem found, before any
model is loaded (so a typo costs a second, not a model load or a search). Pure: the spec is never mutated; what
the planner derives (the methods and their typed configs, the tasks, the bit-widths of a quantized checkpoint,
the samples) lives on the `Plan`.

`make_plan(spec)` raises the first problem as a one-line `HarnessError`; `make_plan(spec, collect=True)` (what
`harness validate` runs) gathers every problem it can find instead, each one line.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from qvlm_harness import plugins
from qvlm_harness.config import CHANNEL_ACTIVATIONS_UNPACKABLE, QuantSpec, RunSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.images import check_images
from qvlm_harness.method import Method
from qvlm_harness.task import Sample, Task

FP_TAG = "fp"
MAX_SEED = 2**63 - 1


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

    @property
    def label(self) -> str:
        return f"{self.method} {self.bits} {self.task}{f' {self.shots}-shot' if self.shots else ''}"


@dataclass(frozen=True)
class QuantJob:
    """One unit of work: quantize a fresh model for (method, spec, calibration task), then evaluate `cells`."""

    method: str
    spec: QuantSpec
    calib_task: str | None
    cells: tuple[Cell, ...]


class _Problems:
    """Collects one-line problems (validate) or raises the first (run)."""

    def __init__(self, collect: bool):
        self.collect = collect
        self.items: list[str] = []

    @contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except HarnessError as exc:
            if not self.collect:
                raise
            self.items.append(str(exc))

    def add(self, message: str) -> None:
        if not self.collect:
            raise HarnessError(message)
        self.items.append(message)


@dataclass
class Plan:
    """What a run will compute and with what; built by `make_plan`, read by executors and the evaluator."""

    spec: RunSpec
    methods: dict[str, Method] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    bits: tuple[QuantSpec, ...] = ()
    checkpoint: dict | None = None  # the manifest when --model is a quantized checkpoint
    model_config: Any = None  # the local model folder's config, once its files passed `check_model_folder`
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict, repr=False)

    # -- the model ----------------------------------------------------------------------------------------------
    @cached_property
    def _model(self) -> tuple[str, str]:
        return resolve_model(self.spec.model)

    @property
    def model_id(self) -> str:
        return self._model[0]

    @property
    def model_path(self) -> str:
        return self._model[1]

    @cached_property
    def skeleton(self):
        """The Llava model `model_config` builds, on the meta device (no memory, no weights; None for a hub id):
        what the structure and group-size checks read."""
        return None if self.model_config is None else meta_skeleton(self.model_config, self.model_path)

    def linear_widths(self) -> dict[str, int]:
        """FQN -> input width of every linear layer in `--quantize`'s scope; empty for a hub id."""
        return {} if self.skeleton is None else linear_widths(self.skeleton, self.spec.scope)

    # -- data -----------------------------------------------------------------------------------------------------
    def data_dir(self, task: str) -> Path | None:
        d = self.spec.data_dir
        if d is None:
            return None
        sub = Path(d) / task
        return sub if sub.is_dir() else Path(d)

    def samples(self, task: str) -> list[Sample]:
        """The evaluation samples of a task, limited by a seeded subset (the same subset for every method)."""
        key = (task, self.spec.split)
        if key not in self._samples:
            samples = self.tasks[task].load(self.spec.split, self.data_dir(task))
            if not samples:
                raise HarnessError(f"task {task}: split {self.spec.split!r} is empty")
            limit = self.spec.limit
            if limit is not None and 0 < limit < len(samples):
                keep = set(random.Random(f"limit-{self.spec.seed}").sample(range(len(samples)), limit))
                samples = [x for i, x in enumerate(samples) if i in keep]
            self._samples[key] = samples
        return self._samples[key]

    def demo_pool(self, task: str) -> list[Sample]:
        t = self.tasks[task]
        return t.load(t.train_split, self.data_dir(task))

    def scoring(self, task: str) -> str:
        modes = self.tasks[task].scoring_modes
        return self.spec.scoring if self.spec.scoring in modes else modes[0]

    def calib_source(self, cell: Cell) -> str | None:
        """The task whose train split calibrates `cell` (None when its method needs no calibration)."""
        if not self.methods[cell.method].needs_calibration(cell.spec):
            return None
        return self.spec.calib_task or cell.task

    def task(self, name: str) -> Task:
        """A planned task, or (for a calibration-only task) a fresh instance."""
        return self.tasks.get(name) or make_task(self.spec, name)

    # -- identity -------------------------------------------------------------------------------------------------
    @cached_property
    def model_content(self) -> str:
        """The model's content fingerprint (every file of its folder; see `qvlm_harness.identity`)."""
        from qvlm_harness.identity import model_fingerprint

        return model_fingerprint(self.model_path)

    def data_content(self, task: str) -> str:
        from qvlm_harness.identity import samples_fingerprint

        return samples_fingerprint(self.samples(task))

    def demo_content(self, task: str) -> str:
        from qvlm_harness.identity import samples_fingerprint

        return samples_fingerprint(self.demo_pool(task))

    def calibration_content(self, task: str) -> str:
        """What the calibration set of `task` holds: the seeded train samples a calibrated cell sees."""
        from qvlm_harness.identity import samples_fingerprint

        return samples_fingerprint(self.calibration_samples(task))

    def calibration_samples(self, task: str) -> list[Sample]:
        """The seeded train samples that calibrate the cells calibrated on `task`."""
        key = (f"calib:{task}", str(self.spec.calib_samples))
        if key not in self._samples:
            self._samples[key] = self.task(task).calibration_samples(self.spec.calib_samples, self.spec.seed,
                                                                     self.data_dir(task))
        return self._samples[key]

    def evaluation_settings(self, cell: Cell) -> dict:
        """The execution settings that can still change `cell`'s per-sample outputs: none for fp32 on the CPU
        (padding-free batches, row-invariant kernels), batch size and threads where kernels are not row-invariant
        (bf16/fp16, GPUs) or a range spans the batch (`qvlm_harness.models.invariance.invariance_key`)."""
        import torch

        from qvlm_harness.models.invariance import invariance_key

        s = self.spec
        threads = s.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or torch.get_num_threads()
        dtype = self.methods[cell.method].compute_dtype or s.dtype
        key = invariance_key(cell.spec, s.execution, dtype, s.batch_size, threads, device=str(s.device))
        if not self.tasks[cell.task].batch_invariant:
            key |= {"batch_size": s.batch_size, "threads": threads}
        return key

    def identity(self, cell: Cell) -> dict:
        """Everything `cell` is computed from (see `qvlm_harness.identity`): contents, config, settings."""
        s = self.spec
        method = self.methods[cell.method]
        ident: dict = {
            "model": self.model_id, "model_content": self.model_content, "dtype": s.dtype,
            "device": str(s.device).split(":")[0],
            "task": cell.task, "split": s.split, "data": self.data_content(cell.task), "limit": s.limit,
            "seed": s.seed, "scoring": self.scoring(cell.task), "max_new_tokens": s.max_new_tokens,
            "shots": cell.shots, "trials": s.trials if cell.shots else 1, "image_control": s.image_control,
            "task_options": s.task_options.get(cell.task) or {},
            "method": method.identity(), "evaluation": self.evaluation_settings(cell),
        }
        if cell.shots:
            ident["demos"] = self.demo_content(cell.task)
        if s.embeddings != "none":  # only when set: cells without it keep their ids
            ident["embeddings"] = s.embeddings
        if s.rotate != "none":  # absent when unrotated: the ids of unrotated cells stay what they were
            ident["rotate"] = s.rotate
        if not method.fixed_precision:
            calib = self.calib_source(cell)
            ident |= {"spec": cell.spec.to_dict(), "scope": sorted(s.scope), "execution": s.execution,
                      "calibration": None if calib is None else {
                          "task": calib, "samples": s.calib_samples, "content": self.calibration_content(calib)}}
        return ident

    def cell_key(self, cell: Cell) -> str:
        """The cell without its contents: rows sharing a key but not an id are the same cell computed from other
        model or data contents (the older ones are superseded)."""
        from qvlm_harness.identity import cell_digest

        ident = self.identity(cell)
        for k in ("model_content", "data", "demos"):
            ident.pop(k, None)
        if ident.get("calibration"):
            ident["calibration"] = {k: v for k, v in ident["calibration"].items() if k != "content"}
        return f"{self._prefix(cell)}-{cell_digest(ident)}"

    def cell_id(self, cell: Cell) -> str:
        """The store key of a cell: a readable prefix and a hash of its identity."""
        from qvlm_harness.identity import cell_digest

        return f"{self._prefix(cell)}-{cell_digest(self.identity(cell))}"

    @staticmethod
    def _prefix(cell: Cell) -> str:
        return f"{cell.method}-{cell.bits}-{cell.task}{f'-{cell.shots}shot' if cell.shots else ''}"

    # -- jobs -----------------------------------------------------------------------------------------------------
    def jobs(self, cells: Sequence[Cell] | None = None) -> list[QuantJob]:
        """The cells grouped by what they are quantized with: one job per (method, spec, calibration task), in
        plan order."""
        groups: dict[tuple[str, QuantSpec, str | None], list[Cell]] = {}
        for c in self.cells if cells is None else cells:
            groups.setdefault((c.method, c.spec, self.calib_source(c)), []).append(c)
        return [QuantJob(m, s, calib, tuple(group)) for (m, s, calib), group in groups.items()]


# -- building the plan -----------------------------------------------------------------------------------------------
def make_plan(spec: RunSpec, *, collect: bool = False) -> Plan:
    """Validate `spec` and list its cells; no model is loaded. See the module docstring for `collect`."""
    from qvlm_harness.checkpoint import StoredQuantization, read_manifest

    problems = _Problems(collect)
    plan = Plan(spec)
    _check_settings(spec, problems)
    for note in _duplicates(spec):
        plan.notes.append(note)
    _check_outputs(spec, problems)
    with problems.check():
        check_model_source(spec.model)
    manifest = None
    with problems.check():
        manifest = read_manifest(spec.model) if Path(str(spec.model)).expanduser().is_dir() else None
    with problems.check():
        plan.model_config = local_model_config(plan.model_path)
    if manifest is not None:  # an already quantized checkpoint: evaluate it as stored
        plan.checkpoint = manifest
        if spec.methods:
            problems.add(f"{spec.model} is a quantized checkpoint ({manifest['method']} {manifest['spec']['tag']}); "
                         f"evaluate it with `harness eval --model {spec.model}` (no --methods)")
        stored = StoredQuantization(manifest, str(spec.model))
        plan.methods[stored.name] = stored
        plan.bits = (stored.spec,)
    else:
        plan.bits = tuple(dict.fromkeys(spec.bits))  # w4a4 and w4a4-token differ until `Method.canonical_spec`
        for name in dict.fromkeys(spec.methods):
            with problems.check():
                canonical = plugins.methods.resolve_name(name)
                if canonical not in plan.methods:
                    cls = plugins.methods.get(canonical)
                    plan.methods[canonical] = cls(**spec.method_options.get(canonical, {}))
        if not spec.methods:
            problems.add(f"no methods given; e.g. --methods {plugins.EXAMPLE_METHODS} (see `harness ls methods`)")
    for name in dict.fromkeys(spec.tasks):
        with problems.check():
            canonical = plugins.tasks.resolve_name(name)
            if canonical not in plan.tasks:
                plan.tasks[canonical] = make_task(spec, canonical)
    if not spec.tasks:
        problems.add(f"no tasks given; e.g. --tasks {plugins.EXAMPLE_TASKS} (see `harness ls tasks`)")
    if spec.calib_task is not None:
        with problems.check():
            plugins.tasks.resolve_name(spec.calib_task)
    with problems.check():
        plan.cells = _cells(plan, problems)
    _check_groups(plan, problems)
    _check_structure(plan, problems)
    _check_rotation(plan, problems)
    _check_data(plan, problems)
    plan.problems = problems.items
    return plan


def make_task(spec: RunSpec, name: str) -> Task:
    canonical = plugins.tasks.resolve_name(name)
    return plugins.tasks.get(canonical)(**spec.task_options.get(canonical, {}))


def _check_settings(spec: RunSpec, problems: _Problems) -> None:
    """Every numeric flag's range, in one place (each a one-line problem naming the flag)."""
    checks = [
        (spec.limit is None or spec.limit > 0, "--limit must be a positive number of samples"),
        (spec.trials >= 1, "--trials must be at least 1"),
        (spec.batch_size >= 1, f"--batch-size must be at least 1, got {spec.batch_size}"),
        (spec.threads is None or spec.threads >= 1,
         f"--threads must be at least 1 (omit it for all cores), got {spec.threads}"),
        (spec.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {spec.max_new_tokens}"),
        (all(k >= 0 for k in spec.shots), f"--shots takes counts >= 0, got {','.join(map(str, spec.shots))}"),
        (spec.calib_samples >= 0, f"--calib-samples must be 0 or more, got {spec.calib_samples}"),
        (0 <= spec.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}, got {spec.seed}"),
    ]
    for ok, message in checks:
        if not ok:
            problems.add(message)
    with problems.check():
        check_device(spec.device)


def check_device(device: str) -> None:
    """The device exists on this machine (cpu, cuda, cuda:N)."""
    import torch

    name = str(device).strip().lower()
    if name == "cpu":
        return
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise HarnessError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise HarnessError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    raise HarnessError(f"unknown --device {device!r}; use cpu, cuda or cuda:N")


def _duplicates(spec: RunSpec) -> list[str]:
    notes = []
    for flag, values in (("--methods", spec.methods), ("--tasks", spec.tasks)):
        seen: dict[str, str] = {}
        for v in values:
            key = v.strip().lower()
            if key in seen:
                notes.append(f"{flag}: {v!r} given twice; evaluated once")
            seen.setdefault(key, v)
    if len(set(spec.bits)) < len(spec.bits):
        notes.append("--bits: a bit-width given twice (or spelled two ways); evaluated once")
    return notes


def _cells(plan: Plan, problems: _Problems) -> list[Cell]:
    spec = plan.spec
    cells: list[Cell] = []
    n_specs = sum(1 if m.fixed_precision else len(plan.bits) for m in plan.methods.values())
    for name, method in plan.methods.items():
        specs = [QuantSpec()] if method.fixed_precision else list(plan.bits)
        resolved: set[QuantSpec] = set()
        for requested in specs:
            qspec = requested if method.fixed_precision else method.canonical_spec(requested)
            if qspec in resolved:
                if qspec != requested:
                    plan.notes.append(f"--bits: {requested.tag} is {qspec.tag} for {name}; evaluated once")
                continue
            resolved.add(qspec)
            reason = method.supports(qspec)
            if reason is None:
                method.check(qspec)
            if reason is not None:
                message = f"method {name} does not support {qspec.tag} ({reason})"
                if n_specs == 1:
                    problems.add(f"{message}; see `harness ls methods`")
                else:
                    plan.notes.append(f"skipping: {message}")
                continue
            if not _packable_activations(plan, name, qspec, problems):
                continue
            for t, task in plan.tasks.items():
                shots = tuple(dict.fromkeys(spec.shots)) if task.supports_shots else (0,)
                if spec.scoring not in task.scoring_modes and len(task.scoring_modes) > 1:
                    raise HarnessError(f"task {t} cannot score by {spec.scoring!r}; use one of "
                                       f"{', '.join(task.scoring_modes)}")
                cells += [Cell(name, qspec, t, k) for k in shots]
    if plan.methods and plan.tasks and not cells:
        raise HarnessError("no method supports any of the requested bit-widths; see `harness ls methods`")
    return cells


def _packable_activations(plan: Plan, name: str, qspec: QuantSpec, problems: _Problems) -> bool:
    """--execution packed and per-input-channel activations: refused when --bits names the channel ranges
    (False); a method whose own default they are (a bare w4a4) runs them simulated, with a note, as it always
    did (True)."""
    computed = plan.methods[name].computed_spec(qspec)
    if plan.spec.execution != "packed" or not computed.quantizes_activations or computed.a_granularity != "channel":
        return True
    if qspec.a_granularity == "channel":
        problems.add(f"--bits {qspec.tag} with --execution packed: {CHANNEL_ACTIVATIONS_UNPACKABLE}; use "
                     "--execution simulated, or per-token (-token) / per-tensor (-tensor) activations")
        return False
    plan.notes.append(f"{name} {qspec.tag} stays simulated under --execution packed (its default activations are "
                      f"{computed.activations}: {CHANNEL_ACTIVATIONS_UNPACKABLE}); give {qspec.tag}-token for "
                      "packable per-token activations")
    return True


def _check_structure(plan: Plan, problems: _Problems) -> None:
    """Methods that walk the model's structure see the seam's description of it, built from the config on the
    meta device (no weights): an unknown architecture or an unmet requirement (aespa and q/k-norm) is refused
    now, not after a search."""
    wanted = {c.method: c.spec for c in plan.cells if plan.methods[c.method].needs_structure}
    if not wanted:
        return
    stacks = None
    with problems.check():
        stacks = model_structure(plan)
    if stacks is None:
        return
    for name, spec in wanted.items():
        reason = plan.methods[name].check_structure(stacks, spec)
        if reason is not None:
            problems.add(f"method {name} cannot quantize this model: {reason}")


def _check_rotation(plan: Plan, problems: _Problems) -> None:
    """--rotate: a known kind, a float model (not a stored checkpoint), and a language model the rotation can fold
    through (norm kinds, widths with a Hadamard), read from the config alone."""
    kind = plan.spec.rotate
    if kind == "none":
        return
    from qvlm_harness.models.architectures import describe_model
    from qvlm_harness.models.rotation import ROTATE_CHOICES, rotation_problem

    if kind not in ROTATE_CHOICES:
        problems.add(f"unknown rotate {kind!r}; choose one of {', '.join(ROTATE_CHOICES)}")
        return
    if plan.checkpoint is not None:
        problems.add(f"{plan.spec.model} is a stored quantized checkpoint: --rotate applies when quantizing a float "
                     "model; drop --rotate")
        return
    if plan.skeleton is None:
        return  # a hub id: checked when the model loads
    with problems.check():
        reason = rotation_problem(describe_model(plan.skeleton, ("projector", "lm")), kind)
        if reason is not None:
            raise HarnessError(f"--rotate {kind} cannot rotate this model: {reason}")


def model_structure(plan: Plan):
    """The seam's stacks of the planned model, from its config alone (None for a hub id not cached here, or a
    folder whose files were refused: the structure is then checked when the model loads)."""
    from qvlm_harness.models.architectures import describe_model

    skeleton = plan.skeleton
    if skeleton is None:
        return None
    try:
        return describe_model(skeleton, [s for s in ("vision", "projector", "lm") if s in plan.spec.scope])
    except (AttributeError, AssertionError, TypeError, ValueError) as exc:  # transformers cannot build this Llava
        raise HarnessError(f"{plan.model_path}: transformers cannot build a Llava from this config "
                           f"({type(exc).__name__}: {exc})") from None


def _check_groups(plan: Plan, problems: _Problems) -> None:
    """`check_group` for every quantizing (method, spec) of the plan (a stored checkpoint is as it was saved)."""
    if plan.checkpoint is not None:
        return
    for method_name, spec in dict.fromkeys((c.method, c.spec) for c in plan.cells):
        with problems.check():
            note = check_group(plan.methods[method_name], spec, plan.linear_widths)
            if note:
                plan.notes.append(note)


def check_group(method: Method, spec: QuantSpec, widths: Callable[[], dict[str, int]]) -> str | None:
    """The group-size rule, the same for every method: a group of G input channels applies to each quantized
    layer whose input width G divides; a layer it does not divide is quantized per output channel (returned as a
    note); a G that divides none of the in-scope layers is refused (every layer would be per-channel under a g
    label). G is the `g<G>` of --bits or, without one, the method's `group_size` option (a method's own default
    is its business). `widths` (FQN -> input width) is called only when there is a group to check."""
    if method.fixed_precision or not spec.quantizes_weights:
        return None
    group = spec.w_group_size or getattr(method.config, "group_size", None)
    if not group:
        return None
    layers = widths()
    if not layers:
        return None  # a hub id: its layers are known when it loads
    source = f"--bits {spec.tag}" if spec.w_group_size else f"{method.name}.group_size={group}"
    misfit = {n: w for n, w in layers.items() if w % group}
    if len(misfit) == len(layers):
        distinct = sorted(set(layers.values()))
        fits = [g for g in (128, 64, 32, 16, 8) if all(w % g == 0 for w in distinct)]
        raise HarnessError(f"{source}: group size {group} divides the input width of none of the {len(layers)} "
                           f"layers in scope (widths {', '.join(map(str, distinct))}); choose "
                           f"{f'e.g. g{fits[0]}' if fits else 'a divisor of one of them'} (layers a group size does "
                           "not divide are quantized per output channel)")
    if misfit:
        odd = ", ".join(map(str, sorted(set(misfit.values()))))
        return (f"{source} ({method.name}): group size {group} does not divide the input width of {len(misfit)} of "
                f"{len(layers)} layers (widths {odd}): those are quantized per output channel")
    return None


def meta_skeleton(config, path: str):
    """The Llava model `config` builds, on the meta device: no memory, no initialisation, no weights."""
    import torch
    from transformers import LlavaForConditionalGeneration

    try:
        with torch.device("meta"):
            return LlavaForConditionalGeneration(config)
    except (AttributeError, AssertionError, TypeError, ValueError, KeyError) as exc:
        raise HarnessError(f"{path}: transformers cannot build a Llava from this config "
                           f"({type(exc).__name__}: {exc})") from None


def linear_widths(model, scope: Sequence[str]) -> dict[str, int]:
    """FQN -> input width of every linear layer of `model` in `scope` (what methods quantize: the layers of
    `LlavaAdapter.linear_names`, so the LM head aside)."""
    from torch import nn

    from qvlm_harness.models.structure import STACK_NAMES, STACK_ROOTS

    prefixes = tuple(STACK_ROOTS[s] + "." for s in STACK_NAMES if s in scope)
    return {n: m.in_features for n, m in model.named_modules() if n.startswith(prefixes) and isinstance(m, nn.Linear)}


def _check_data(plan: Plan, problems: _Problems) -> None:
    """Data problems surface now, before any model is loaded: every evaluated split, the few-shot pools, and the
    calibration splits of the cells that calibrate."""
    spec = plan.spec
    for t in plan.tasks:
        with problems.check():
            samples = plan.samples(t)
            if spec.image_control != "blank":  # a blank control never opens the images
                check_images((f"sample {x.id}", x.image) for x in samples)
        if any(c.shots for c in plan.cells if c.task == t):
            with problems.check():
                plan.demo_pool(t)
    calibrated = {plan.calib_source(c) for c in plan.cells} - {None}
    if calibrated and spec.calib_samples == 0:
        methods = sorted({c.method for c in plan.cells if plan.calib_source(c)})
        problems.add(f"{', '.join(methods)} calibrate on samples, but --calib-samples is 0; pass N >= 1")
    for t in sorted(calibrated):
        with problems.check():
            task = plan.task(t)
            if not task.load(task.train_split, plan.data_dir(t)):
                raise HarnessError(f"task {t}: its calibration split {task.train_split!r} has no samples; "
                                   "calibrate on another task with --calib-task")
            if spec.calib_samples > 0:
                check_images((f"calibration sample {x.id} of {t}", x.image) for x in plan.calibration_samples(t))


def _check_outputs(spec: RunSpec, problems: _Problems) -> None:
    """Where results go: --output a writable folder, the store a writable harness store (see
    `qvlm_harness.writable`): found now, not at the first write after a cell was computed."""
    from qvlm_harness.store import check_store_path
    from qvlm_harness.writable import check_output_folder

    before = len(problems.items)
    with problems.check():
        check_output_folder(spec.output, "--output")
    if spec.store is not None or len(problems.items) == before:  # the default store is inside --output
        with problems.check():
            check_store_path(spec.store_path)


# -- models -----------------------------------------------------------------------------------------------------------
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


def local_model_config(path: str):
    """The config of a local model folder whose files pass `check_model_folder` (config, weights, tokenizer);
    None for a hub id (checked when it loads)."""
    from qvlm_harness.models.folder import check_model_folder

    local = Path(str(path)).expanduser()
    if not local.is_dir():
        return None
    return check_model_folder(local)
