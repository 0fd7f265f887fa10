"""`harness bench --throughput --profile`: where one evaluation pass spends its time, and how much of the work it
executes the answers needed.

The pass is the same as the timed one (`qvlm_harness.throughput.evaluate_pass`), run under torch.profiler with
named ranges put around the parts from outside (module hooks and a wrapper on the adapter's `encode`; the
evaluation code is not changed):

- `processing`: tokenization, image loading and preprocessing (`adapter.encode`);
- `image`: the vision tower and the projector;
- `prefill`: model forwards over more than one position (the prompt; loglik scoring's forward);
- `decode`: model forwards over one new position per sequence (a ragged step holds them in one row, and no
  prompt's first position: `qvlm_harness.models.ragged`);
- `answer`: the rest of `task.answer` (the generate loop: choosing tokens, stopping, feeding the next step;
  detokenization);
- what is left of the pass's wall time: building the task's requests and scoring.

Inside each range the op self times are split into GEMMs, attention and other ops; the range's own self time
(wall time in it not spent in any op) is Python/framework overhead. The profiler adds overhead of its own to
every op, so the Python shares are inflated somewhat; the op times are not.

A second, unprofiled pass counts the FLOPs really executed (`qvlm_harness.flops.executed_flops`) and the LM
positions and decode rows really run, against what the answers required (`qvlm_harness.flops.sample_flops`):
padding, logits for positions nobody reads and decode steps of finished sequences show up as the difference.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from qvlm_harness.bench import Variant
from qvlm_harness.flops import ExecutedFlops, ModelShapes, executed_flops, sample_flops
from qvlm_harness.throughput import Workload, evaluate_pass

RANGE = "harness::"  # record_function names of the profiled phases
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_int_mm",
            "harness_kernels::int_linear", "aten::_weight_int4pack_mm", "aten::convolution", "aten::_convolution",
            "aten::mkldnn_convolution", "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise")
ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::scaled_dot_product")
PHASES = ("processing", "image", "prefill", "decode", "answer")
PHASE_LABELS = {"processing": "processing (tokenize, images)", "image": "image encoding", "prefill": "prefill",
                "decode": "decode steps", "answer": "answer loop outside the model"}
PROFILE_SAMPLES = 8  # per batch size at least one batch; the profiler's event list (and its cost) grows per op


@dataclass
class PassCounters:
    """What the hooks saw: LM positions run in prefill (padding included) and decode rows (one per sequence per
    step, finished sequences included)."""

    prefill_positions: int = 0
    decode_rows: int = 0
    decode_steps: int = 0


@dataclass
class EvalProfile:
    label: str
    batch_size: int
    samples: int
    wall_ms_per_sample: float
    breakdown: dict[str, float]  # "phase: kind" -> ms per sample, in display order
    top: list[tuple[str, int, float]]  # (op, calls per sample, self ms per sample)
    executed: dict[str, float]  # per-sample executed work (FLOPs by part, positions, decode rows)
    required: dict[str, float]  # the same, as the answers required
    counters: dict[str, int] = field(default_factory=dict)
    timed_ms_per_sample: float | None = None  # the same cell without the profiler (median of its timed rounds)

    def largest(self) -> tuple[str, float]:
        name = max(self.breakdown, key=lambda k: self.breakdown[k])
        return name, self.breakdown[name]

    def to_text(self) -> str:
        timed = f"; {self.timed_ms_per_sample:.1f} ms in the timed rounds" if self.timed_ms_per_sample else ""
        lines = [f"{self.label}, batch {self.batch_size}: {self.wall_ms_per_sample:.1f} ms per sample (profiled pass "
                 f"of {self.samples} samples; the profiler adds overhead of its own{timed})"]
        lines.append(f"  {'where the time goes':<46} {'ms/sample':>10} {'share':>7}")
        for name, ms in self.breakdown.items():
            lines.append(f"  {name:<46} {ms:10.2f} {100 * ms / self.wall_ms_per_sample:6.1f}%")
        lines.append("  work per sample (executed: padding, unread logits and finished sequences included;")
        lines.append(f"  {'required: what the answers need)':<46} {'executed':>10} {'required':>10}")
        for key, ex in self.executed.items():
            req = self.required.get(key)
            lines.append(f"  {key:<46} {ex:10.4g} {req:10.4g}" if req is not None else f"  {key:<46} {ex:10.4g}")
        lines.append(f"  {'op':<52} {'calls/sample':>12} {'self ms/sample':>14}")
        lines += [f"  {name[:52]:<52} {calls:>12} {ms:>14.3f}" for name, calls, ms in self.top]
        return "\n".join(lines)


class _Ranges:
    """Opens a profiler range when a module's forward starts and closes it when it ends (hooks), and counts the
    positions the language model runs."""

    def __init__(self, adapter, counters: PassCounters):
        self.adapter = adapter
        self.counters = counters
        self.open: list[torch.autograd.profiler.record_function] = []
        self.handles: list = []

    def _enter(self, name: str) -> None:
        rf = torch.autograd.profiler.record_function(RANGE + name)
        rf.__enter__()
        self.open.append(rf)

    def _exit(self, *_args) -> None:
        self.open.pop().__exit__(None, None, None)

    def _model_pre(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        batch, positions = (int(ref.shape[0]), int(ref.shape[1])) if ref is not None else (0, 0)
        pos = kwargs.get("position_ids")
        if batch == 1 and positions > 1 and pos is not None and bool((pos != 0).all()):
            batch, positions = positions, 1  # a ragged decode step: one new position per prompt, in one row
        if positions > 1:
            self.counters.prefill_positions += batch * positions
            self._enter("prefill")
        else:
            self.counters.decode_rows += batch
            self.counters.decode_steps += 1
            self._enter("decode")

    def install(self) -> None:
        model = self.adapter.model
        self.handles.append(model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._exit))
        for prefix in ("model.vision_tower", "model.multi_modal_projector"):
            part = model.get_submodule(prefix)
            self.handles.append(part.register_forward_pre_hook(lambda *_a: self._enter("image")))
            self.handles.append(part.register_forward_hook(self._exit))
        encode = self.adapter.encode

        def timed_encode(*args, **kwargs):
            with torch.autograd.profiler.record_function(RANGE + "processing"):
                return encode(*args, **kwargs)

        self.adapter.encode = timed_encode  # instance attribute: shadows the method while profiling

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.adapter.__dict__.pop("encode", None)
        while self.open:
            self._exit()


@contextmanager
def _answer_range() -> Iterator[None]:
    with torch.autograd.profiler.record_function(RANGE + "answer"):
        yield


def _op_kind(name: str) -> str:
    if name.startswith(ATTENTION_OPS):
        return "attention"
    if name.startswith(GEMM_OPS):
        return "GEMM"
    return "other ops"


def _phase_of(event) -> str | None:
    e = event
    while e is not None:
        if e.name.startswith(RANGE):
            return e.name[len(RANGE):]
        e = e.cpu_parent
    return None


def attribute(events) -> tuple[dict[str, float], dict[str, tuple[int, float]]]:
    """Self time (us) per "phase: kind" from profiler events, and (calls, self us) per op name."""
    buckets: dict[str, float] = {}
    ops: dict[str, tuple[int, float]] = {}
    for e in events:
        self_us = e.self_cpu_time_total
        if e.name.startswith(RANGE):
            key = f"{e.name[len(RANGE):]}: Python/framework"
        else:
            phase = _phase_of(e.cpu_parent)
            kind = _op_kind(e.name)
            key = f"{phase}: {kind}" if phase else f"outside: {kind}"
            calls, us = ops.get(e.name, (0, 0.0))
            ops[e.name] = (calls + 1, us + self_us)
        buckets[key] = buckets.get(key, 0.0) + self_us
    return buckets, ops


def profile_pass(variant: Variant, workload: Workload, shapes: ModelShapes, batch_size: int,
                 n_samples: int | None = None, top: int = 12, timed_ms_per_sample: float | None = None) -> EvalProfile:
    """Profile one evaluation pass of `variant` at `batch_size` (the first `n_samples` samples; default
    `PROFILE_SAMPLES`, at least one batch), then count its executed FLOPs in a second pass."""
    from torch.profiler import ProfilerActivity, profile

    n = n_samples or min(len(workload.samples), max(PROFILE_SAMPLES, batch_size))
    samples = workload.samples[:n]
    adapter = variant.adapter
    counters = PassCounters()
    ranges = _Ranges(adapter, counters)
    ranges.install()
    answer_wall = [0.0]

    @contextmanager
    def around_answer() -> Iterator[None]:
        t0 = time.perf_counter()
        with _answer_range():
            yield
        answer_wall[0] += time.perf_counter() - t0

    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = evaluate_pass(workload, adapter, batch_size, samples, around_answer=around_answer)
    finally:
        ranges.remove()
    buckets, ops = attribute(prof.events())
    per = 1.0 / (1000.0 * n)  # profiler microseconds in total -> ms per sample
    wall_ms = 1000.0 * result.wall_s / n
    breakdown: dict[str, float] = {}
    for phase in PHASES:
        for kind in ("GEMM", "attention", "other ops", "Python/framework"):
            key = f"{phase}: {kind}"
            if buckets.get(key):
                label = PHASE_LABELS[phase] if phase == "processing" else f"{PHASE_LABELS[phase]}: {kind}"
                breakdown[label] = breakdown.get(label, 0.0) + buckets[key] * per
    breakdown["task requests + scoring"] = max(0.0, wall_ms - 1000.0 * answer_wall[0] / n)
    profiled_ms = sum(breakdown.values())
    if wall_ms > profiled_ms:
        breakdown["unattributed"] = wall_ms - profiled_ms
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]
    ex_counters = PassCounters()
    ex_ranges = _Ranges(adapter, ex_counters)
    ex_ranges.install()
    try:
        with executed_flops(adapter.model) as ex:
            answered = evaluate_pass(workload, adapter, batch_size, samples)
    finally:
        ex_ranges.remove()
    tokens = Workload(workload.task, samples, workload.scoring, workload.max_new_tokens,
                      workload.tokens[:n]).answered_tokens(answered.responses)
    required_counts = [sample_flops(shapes, t) for t in tokens]
    executed, required = _work(ex, ex_counters, required_counts, tokens, n)
    return EvalProfile(variant.label, batch_size, n, wall_ms, breakdown,
                       [(name, round(calls / n), us * per) for name, (calls, us) in top_ops], executed, required,
                       {"prefill_positions": counters.prefill_positions, "decode_rows": counters.decode_rows,
                        "decode_steps": counters.decode_steps}, timed_ms_per_sample)


def _work(ex: ExecutedFlops, counters: PassCounters, required_counts, tokens, n: int):
    """Executed vs required work per sample: GFLOP by part, LM prompt positions, decode rows."""
    req_parts = {"vision": sum(c.part("vision") for c in required_counts),
                 "projector": sum(c.part("projector") for c in required_counts),
                 "lm": sum(c.part("prefill") + c.part("decode") for c in required_counts),
                 "head": sum(c.part("head") for c in required_counts)}
    executed = {"GFLOP total": ex.total / n / 1e9}
    required = {"GFLOP total": sum(c.total for c in required_counts) / n / 1e9}
    names = {"vision": "GFLOP vision tower", "projector": "GFLOP projector", "lm": "GFLOP LM trunk",
             "head": "GFLOP LM head"}
    for part, label in names.items():
        executed[label] = ex.parts.get(part, 0) / n / 1e9
        required[label] = req_parts[part] / n / 1e9
    executed["LM prompt positions"] = counters.prefill_positions / n
    required["LM prompt positions"] = sum(t.prompt_tokens for t in tokens) / n
    executed["decode rows (sequences x steps)"] = counters.decode_rows / n
    required["decode rows (sequences x steps)"] = sum(max(0, t.generated - 1) for t in tokens) / n
    return executed, required
