"""`harness bench --throughput`: how fast the evaluation runs, against what this machine can do.

Every variant (method x bits, packed like the rest of `harness bench`) evaluates the same N task samples through
the runner's evaluation path: task requests -> `task.answer` (the adapter's generate/loglik, batched) -> task
scoring. That gives samples/s, prompt tokens/s and generated tokens/s, medians over rounds.

Beside it, in the same run, the machine's limit: the FLOPs each sample needs (`qvlm_harness.flops`, from the model's
shapes and the sample's real, unpadded token counts and answer length) over the dense GEMM rate this machine
reaches right now at the variant's dtypes, the same threads and the batch's token counts
(`qvlm_harness.gemm_rate`). Per part of the model (vision tower, projector, prefill, LM head, decode) the rate is
that of its own layer mix:

    limit_samples_per_s = 1 / mean over samples of sum over parts (flops_part / rate_part)
                        = effective rate / flops_per_sample
    efficiency          = samples_per_s / limit_samples_per_s

Attention FLOPs are charged at their part's linear-layer rate (an upper bound: small per-head matmuls run slower
than the layers' GEMMs). The fp32 variant is the baseline; `x_fp32` ratios compare rows of the same run.

On a shared machine the cores come and go. Two things keep the figures comparable: the samples are evaluated in
slices, every cell (variant x batch size) taking its turn on each slice right after measuring its GEMM rates, so
slow phases hit all cells and their limits alike; and `cpu_efficiency` repeats the comparison in process CPU time
(the GEMMs' CPU-time rate against the evaluation's CPU time), which does not count the time the process waited
for a core.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qvlm_harness import plugins
from qvlm_harness.bench import BASELINE, BenchConfig, Variant, build_variants, variant_specs
from qvlm_harness.errors import HarnessError
from qvlm_harness.flops import PARTS, FlopCount, ModelShapes, SampleTokens, generated_distributions, sample_flops
from qvlm_harness.gemm_rate import GemmShape, mix_rate, time_gemms
from qvlm_harness.task import Request, Response, Sample, Task

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class ThroughputConfig:
    """What `--throughput` adds to a `BenchConfig` (whose methods, bits, batch sizes, threads, rounds, task and
    `new_tokens`, the generation cap, it uses)."""

    samples: int = 64
    scoring: str = "generate"
    data_dir: Path | None = None
    split: str = "test"


# -- the workload: samples, their requests and their real token counts ------------------------------------------------


@dataclass
class Workload:
    """The evaluated samples and how they are asked, as `harness run --limit N` would ask them."""

    task: Task
    samples: list[Sample]
    scoring: str
    max_new_tokens: int
    tokens: list[SampleTokens] = field(default_factory=list)  # per sample, answer length still 0

    def request(self, sample: Sample) -> Request:
        """The runner's request for one sample (no demonstrations: zero-shot)."""
        req = self.task.request(sample, scoring=self.scoring, demos=())
        if req.kind == "generate":
            req.max_new_tokens = self.max_new_tokens
        return req

    def answered_tokens(self, responses: Sequence[Response]) -> list[SampleTokens]:
        """Each sample's token counts with the answer length its response had (loglik: no generated tokens)."""
        out = []
        for tok, sample, resp in zip(self.tokens, self.samples, responses, strict=True):
            if resp.new_tokens is None:
                out.append(tok)
                continue
            cap = self.request(sample).max_new_tokens
            out.append(SampleTokens(tok.prompt_tokens, tok.image_sizes, tok.image_tokens,
                                    generated_distributions(resp.new_tokens, cap), tok.continuations))
        return out


def select_samples(task: Task, n: int, seed: int, split: str = "test", data_dir: Path | None = None) -> list[Sample]:
    """The seeded subset `harness run --limit n --seed seed` evaluates (same samples, same order)."""
    pool = task.load(split, data_dir)
    if not pool:
        raise HarnessError(f"task {task.name}: split {split!r} is empty")
    if n > len(pool):
        raise HarnessError(f"--samples {n} is more than the {len(pool)} samples of {task.name} {split}; "
                           f"use --samples {len(pool)} or fewer")
    if n == len(pool):
        return list(pool)
    keep = set(random.Random(f"limit-{seed}").sample(range(len(pool)), n))
    return [x for i, x in enumerate(pool) if i in keep]


def count_tokens(adapter, workload: Workload, shapes: ModelShapes) -> list[SampleTokens]:
    """Each sample's prompt as the model sees it, encoded on its own (no padding): LM positions, images and their
    pixel sizes, image tokens; loglik options that span several tokens."""
    out = []
    for sample in workload.samples:
        req = workload.request(sample)
        batch = adapter.encode([req])
        ids = batch["input_ids"][0]
        pixels = batch.get("pixel_values")
        sizes = tuple(tuple(int(d) for d in pixels.shape[-2:]) for _ in range(pixels.shape[0])) if pixels is not None \
            else ()
        continuations: tuple[int, ...] = ()
        if req.kind == "loglik":
            lengths = tuple(len(adapter.tokenizer(o, add_special_tokens=False).input_ids) for o in req.options)
            continuations = lengths if any(n > 1 for n in lengths) else ()
        out.append(SampleTokens(int(ids.shape[0]), sizes, int((ids == shapes.image_token_id).sum()),
                                0, continuations))
    return out


# -- one evaluation pass ----------------------------------------------------------------------------------------------


@dataclass
class EvalPass:
    wall_s: float
    cpu_s: float  # process CPU time (all threads) during the pass
    load_1min: float  # the machine's 1-minute load average when the pass started
    responses: list[Response]
    records: list[dict[str, Any]]


def evaluate_pass(workload: Workload, adapter, batch_size: int, samples: Sequence[Sample] | None = None,
                  around_answer: Callable[[], AbstractContextManager] | None = None) -> EvalPass:
    """Evaluate `samples` (default: all) the way the runner's `_evaluate` does, minus its store and sample log:
    per batch, build the task's requests, `task.answer` them, score each response."""
    samples = workload.samples if samples is None else samples
    load = os.getloadavg()[0]
    responses: list[Response] = []
    records: list[dict[str, Any]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        requests = [workload.request(s) for s in chunk]
        with (around_answer or nullcontext)():
            answers = workload.task.answer(adapter, requests, batch_size=batch_size)
        records += [workload.task.score(s, r) for s, r in zip(chunk, answers, strict=True)]
        responses += answers
    return EvalPass(time.perf_counter() - t0, time.process_time() - c0, load, responses, records)


# -- the machine's limit ----------------------------------------------------------------------------------------------


def compute_dtype(module: nn.Module, activation_dtype: torch.dtype) -> str:
    """The dtype a layer's GEMM runs in: int8 for packed integer layers (also inside wrappers), bf16 for the int4
    weight-only kernel, else its weight's dtype (fake-quant layers compute in float)."""
    from qvlm_harness.kernels.linear import IntLinear, WeightOnlyLinear

    if any(isinstance(m, IntLinear) for m in module.modules()):
        return "int8"
    if isinstance(module, WeightOnlyLinear):
        return "bf16" if module.kernel == "int4pack" else DTYPE_NAMES.get(activation_dtype, "fp32")
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return DTYPE_NAMES.get(weight.dtype, "fp32")
    return DTYPE_NAMES.get(activation_dtype, "fp32")


@dataclass(frozen=True)
class ComputePlan:
    """Which dtype each GEMM of one variant runs in."""

    layer_dtypes: dict[str, str]
    conv_dtype: str

    @classmethod
    def of(cls, model: nn.Module, shapes: ModelShapes) -> ComputePlan:
        act = next(model.parameters()).dtype
        names = [s.name for p in PARTS if p != "decode" for s in shapes.linears(p)]
        layer = {n: compute_dtype(model.get_submodule(n), act) for n in names}
        conv = DTYPE_NAMES.get(model.get_submodule(shapes.patch_convs[0].name).weight.dtype, "fp32") \
            if shapes.patch_convs else "fp32"
        return cls(layer, conv)

    def dtypes(self, shapes: ModelShapes, part: str) -> list[str]:
        return sorted({self.layer_dtypes[s.name] for s in shapes.linears(part)})


def part_tokens(workload: Workload, shapes: ModelShapes, batch_size: int) -> dict[str, int]:
    """GEMM row counts (M) a batch of `batch_size` typical samples gives each part: real tokens, no padding."""
    toks = workload.tokens
    images = sum(len(t.image_sizes) for t in toks)
    per_batch_images = max(1, round(batch_size * images / len(toks))) if images else 0
    feature = statistics.fmean(t.image_tokens / len(t.image_sizes) for t in toks if t.image_sizes) if images else 0
    prompt = statistics.fmean(t.prompt_tokens for t in toks)
    return {"vision": round(per_batch_images * (feature + shapes.dropped_vision_tokens)),
            "projector": round(per_batch_images * feature), "prefill": max(1, round(batch_size * prompt)),
            "head": batch_size, "decode": batch_size, "images": per_batch_images}


def part_mixes(shapes: ModelShapes, plan: ComputePlan, tokens: dict[str, int],
               image_size: tuple[int, int] | None) -> dict[str, list[tuple[GemmShape, int]]]:
    """Per part, the (GEMM shape, count) of each of its layers at the batch's row count and the layer's dtype."""
    mixes: dict[str, list[tuple[GemmShape, int]]] = {}
    for part in PARTS:
        m = tokens[part]
        if m <= 0:
            continue
        counts: dict[GemmShape, int] = {}
        for s in shapes.linears(part):
            g = GemmShape(m, s.in_features, s.out_features, plan.layer_dtypes[s.name])
            counts[g] = counts.get(g, 0) + 1
        if part == "vision" and image_size is not None:
            for c in shapes.patch_convs:
                g = GemmShape(tokens["images"] * c.positions(image_size), c.gemm_k, c.out_channels, plan.conv_dtype)
                counts[g] = counts.get(g, 0) + 1
        if counts:
            mixes[part] = list(counts.items())
    return mixes


@dataclass(frozen=True)
class PartRates:
    """FLOP/s per part, by wall time and by process CPU time."""

    wall: dict[str, float]
    cpu: dict[str, float]


def part_rates(mixes: dict[str, list[tuple[GemmShape, int]]]) -> PartRates:
    """Measure every GEMM of the mixes now and return FLOP/s per part."""
    timings = time_gemms(g for mix in mixes.values() for g, _ in mix)
    wall = {g: t.wall_s for g, t in timings.items()}
    cpu = {g: t.cpu_s for g, t in timings.items()}
    return PartRates({p: mix_rate(m, wall) for p, m in mixes.items()}, {p: mix_rate(m, cpu) for p, m in mixes.items()})


def limit_seconds(counts: Sequence[FlopCount], rates: dict[str, float]) -> float:
    """Seconds the samples' FLOPs take at the measured rates (each part at its own rate)."""
    total = 0.0
    for c in counts:
        for part in PARTS:
            flops = c.part(part)
            if flops:
                rate = rates.get(part, 0.0)
                if rate <= 0:
                    raise HarnessError(f"no GEMM rate was measured for the {part} part; rerun (timer too coarse?)")
                total += flops / rate
    return total


# -- the whole measurement --------------------------------------------------------------------------------------------


@dataclass
class Round:
    """One cell's evaluation of all samples in one round (the sum of its slices), and the time the samples'
    FLOPs take at the GEMM rates measured before each slice."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    limit_wall_s: float = 0.0
    limit_cpu_s: float = 0.0
    loads: list[float] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    rates: list[PartRates] = field(default_factory=list)


@dataclass
class Cell:
    """One (variant, batch size): its rounds."""

    variant: Variant
    batch_size: int
    plan: ComputePlan
    mixes: dict[str, list[tuple[GemmShape, int]]]
    rounds: list[Round] = field(default_factory=list)

    def evaluate_slice(self, workload: Workload, shapes: ModelShapes, start: int, stop: int, into: Round) -> None:
        """GEMM rates now, then samples[start:stop] through the evaluation path, added to `into`."""
        rates = part_rates(self.mixes)
        part = evaluate_pass(workload, self.variant.adapter, self.batch_size, workload.samples[start:stop])
        tokens = Workload(workload.task, workload.samples[start:stop], workload.scoring, workload.max_new_tokens,
                          workload.tokens[start:stop]).answered_tokens(part.responses)
        counts = [sample_flops(shapes, t) for t in tokens]
        into.wall_s += part.wall_s
        into.cpu_s += part.cpu_s
        into.limit_wall_s += limit_seconds(counts, rates.wall)
        into.limit_cpu_s += limit_seconds(counts, rates.cpu)
        into.loads.append(part.load_1min)
        into.responses += part.responses
        into.records += part.records
        into.rates.append(rates)


def slice_size(batch_sizes: Sequence[int], at_least: int = 16) -> int:
    """Samples per interleaving slice: a multiple of every batch size (so each cell's batches are exactly those
    of one whole pass) and at least `at_least`."""
    step = math.lcm(*batch_sizes)
    return step * max(1, -(-at_least // step))


def resolve_scoring(task: Task, scoring: str) -> str:
    """The runner's rule: the requested scoring if the task has it; a task with one mode uses that one."""
    if scoring in task.scoring_modes:
        return scoring
    if len(task.scoring_modes) == 1:
        return task.scoring_modes[0]
    raise HarnessError(f"task {task.name} cannot score by {scoring!r}; use --scoring "
                       f"{' or '.join(task.scoring_modes)}")


def run_throughput(cfg: BenchConfig, tcfg: ThroughputConfig, *, profile: bool = False,
                   log: Callable[[str], None] = print) -> dict:
    """Evaluate every variant at every batch size in interleaved rounds; returns {"rows", "profiles", "env"}.

    Interleaving is finer than a round: the samples are cut into slices (`slice_size`) and every cell evaluates
    a slice, right after measuring its GEMM rates, before any cell moves to the next, so a slow phase of a shared
    machine hits every cell and its limit alike."""
    from qvlm_harness.kernels import cpu as cpu_kernels
    from qvlm_harness.models.llava import LlavaAdapter, set_threads
    from qvlm_harness.runner import resolve_model

    task = plugins.tasks.get(cfg.task)()
    scoring = resolve_scoring(task, tcfg.scoring)
    samples = select_samples(task, tcfg.samples, cfg.seed, tcfg.split, tcfg.data_dir)  # data errors before the model
    pairs = variant_specs(cfg)
    threads = set_threads(cfg.threads)
    model_id, model_path = resolve_model(cfg.model)
    load_before = os.getloadavg()
    step = slice_size(cfg.batch_sizes)
    log(f"bench --throughput: model {model_id}; {threads} thread(s); {len(samples)} {task.name} samples "
        f"({scoring}); {len(pairs)} variants; batch sizes {list(cfg.batch_sizes)}; {cfg.rounds} rounds interleaved "
        f"in slices of {step} samples; load average {load_before[0]:.2f}")
    base = LlavaAdapter.load(model_path)
    shapes = ModelShapes.from_model(base.model)
    workload = Workload(task, samples, scoring, cfg.new_tokens)
    workload.tokens = count_tokens(base, workload, shapes)
    image_size = next((t.image_sizes[0] for t in workload.tokens if t.image_sizes), None)
    variants = build_variants(base, pairs, cfg, log)
    del base
    cells = []
    for bs in cfg.batch_sizes:
        tokens = part_tokens(workload, shapes, bs)
        for v in variants:
            plan = ComputePlan.of(v.adapter.model, shapes)
            cells.append(Cell(v, bs, plan, part_mixes(shapes, plan, tokens, image_size)))
    for c in cells:  # warm-up: kernel builds, first-call allocations, oneDNN primitives of the first shapes
        t0 = time.perf_counter()
        evaluate_pass(workload, c.variant.adapter, c.batch_size, samples[:c.batch_size])
        c.variant.setup_s += time.perf_counter() - t0
    for r in range(cfg.rounds):
        for c in cells:
            c.rounds.append(Round())
        for start in range(0, len(samples), step):
            for c in cells:
                c.evaluate_slice(workload, shapes, start, min(start + step, len(samples)), c.rounds[-1])
        for c in cells:
            done = c.rounds[-1]
            share = done.cpu_s / (done.wall_s * threads)
            log(f"    {c.variant.label} batch {c.batch_size}: {len(samples) / done.wall_s:.2f} samples/s, "
                f"efficiency {done.limit_wall_s / done.wall_s:.3f} (CPU share {share:.2f})")
        log(f"  round {r + 1}/{cfg.rounds} done (load average {os.getloadavg()[0]:.2f})")
    rows = [cell_row(c, workload, shapes, threads) for c in cells]
    for row in rows:
        ref = next(r for r in rows if r["batch"] == row["batch"] and r["method"] == BASELINE)
        row["x_fp32"] = row["samples_per_s"] / ref["samples_per_s"]
        row["limit_x_fp32"] = row["limit_samples_per_s"] / ref["limit_samples_per_s"]
    profiles = []
    if profile:
        from qvlm_harness.eval_profile import profile_pass

        for c, row in zip(cells, rows, strict=True):
            log(f"  profiling {c.variant.label} batch {c.batch_size}")
            profiles.append(profile_pass(c.variant, workload, shapes, c.batch_size,
                                         timed_ms_per_sample=1000.0 / row["samples_per_s"]))
    load_after = os.getloadavg()
    env = {"model": model_id, "threads": threads, "torch": torch.__version__, "task": task.name,
           "split": task.resolve_split(tcfg.split), "scoring": scoring, "samples": len(samples),
           "max_new_tokens": cfg.new_tokens, "rounds": cfg.rounds, "slice": step, "backend": cfg.backend,
           "execution": cfg.execution, "fused_kernel": cpu_kernels.unavailable_reason() or "on", "cpu": cpu_model(),
           "cores": os.cpu_count(), "loadavg_before": list(load_before), "loadavg_after": list(load_after),
           "attention_count": "LM attention causal (T(T+1)/2 query-key pairs), vision tower full T^2",
           "mean_prompt_tokens": statistics.fmean(t.prompt_tokens for t in workload.tokens),
           "image_share": sum(bool(t.image_sizes) for t in workload.tokens) / len(workload.tokens)}
    return {"rows": rows, "profiles": profiles, "env": env}


def cell_row(c: Cell, workload: Workload, shapes: ModelShapes, threads: int) -> dict:
    """The reported figures of one cell: medians over its rounds."""
    n = len(workload.samples)
    walls = [r.wall_s for r in c.rounds]
    wall = statistics.median(walls)
    limit_s = statistics.median(r.limit_wall_s for r in c.rounds)
    first = c.rounds[0]
    tokens = workload.answered_tokens(first.responses)
    counts = [sample_flops(shapes, t) for t in tokens]
    flops = sum(x.total for x in counts)
    samples_per_s = n / wall
    limit = n / limit_s
    generated = sum(r.new_tokens or 0 for r in first.responses)
    metrics = workload.task.aggregate(first.records)
    primary = workload.task.primary_metric
    all_rates = [pr for r in c.rounds for pr in r.rates]
    v = c.variant
    return {
        "method": v.method, "bits": v.bits, "exec": v.execution, "batch": c.batch_size, "threads": threads,
        "samples": n, "samples_per_s": samples_per_s,
        "prompt_tokens_per_s": sum(t.prompt_tokens for t in tokens) / wall,
        "generated_tokens_per_s": generated / wall,
        "flops_per_sample": flops / n, "gflop_per_sample": flops / n / 1e9,
        "flops_by_part": {p: sum(x.part(p) for x in counts) / n for p in PARTS},
        "attention_flops_per_sample": sum(x.kind("attention") for x in counts) / n,
        "gemm_gflops": {p: statistics.median(pr.wall[p] for pr in all_rates) / 1e9 for p in c.mixes},
        "gemm_gflops_cpu": {p: statistics.median(pr.cpu[p] for pr in all_rates) / 1e9 for p in c.mixes},
        "gemm_dtypes": {p: "+".join(c.plan.dtypes(shapes, p)) for p in c.mixes},
        "gemm_rows": {p: mix[0][0].m for p, mix in c.mixes.items()},
        "rate_gflops": flops / n * limit / 1e9,  # the effective rate: limit = rate / flops per sample
        "limit_samples_per_s": limit, "efficiency": samples_per_s / limit,
        "cpu_efficiency": statistics.median(r.limit_cpu_s for r in c.rounds) / statistics.median(
            r.cpu_s for r in c.rounds),
        "accuracy": float(metrics[primary]) if primary in metrics else None, "metric": primary,
        "generated_tokens_per_sample": generated / n,
        "wall_s": wall, "wall_s_rounds": walls,
        "efficiency_rounds": [r.limit_wall_s / r.wall_s for r in c.rounds],
        "cpu_share": statistics.median(r.cpu_s / (r.wall_s * threads) for r in c.rounds),
        "load_1min": statistics.median(x for r in c.rounds for x in r.loads), "setup_s": v.setup_s,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"
