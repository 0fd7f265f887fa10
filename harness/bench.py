"""`harness bench`: real speed and memory of quantized models, each as a ratio to the FP32 baseline of the same run.

For every (method, bits) the model is quantized through the method registry and converted to packed kernels
(`qvlm_harness.kernels.convert_to_packed`); what cannot be converted stays simulated and is labelled so. All variants
are held in one process and timed in interleaved rounds (every round runs each variant once, in the same order),
so the machine's slow phases hit all of them alike; the figures are medians over rounds. Measured per variant and
batch size: prefill latency (prompt forward up to the first new token), decode tokens/s (the remaining tokens,
generation forced to full length), weight bytes as held (whole model, and the quantizable linear layers alone),
and the peak RSS while generating, measured in a fresh child process per variant so variants do not share a
heap; beside it, each variant loaded from its saved checkpoint in a fresh process, as a deployment loads it
(peak RSS including the load, and the resident weight bytes: `qvlm_harness.bench_memory`).
`profile_decode` shows where one decode step's time goes (torch.profiler, op self times).
"""

from __future__ import annotations

import copy
import gc
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qvlm_harness import plugins
from qvlm_harness.config import ALL_SCOPES, CHANNEL_ACTIVATIONS_UNPACKABLE, QuantSpec, Scope
from qvlm_harness.device import PeakDeviceMemory, is_cuda, sync
from qvlm_harness.errors import HarnessError
from qvlm_harness.measure import PeakRSS, current_rss_mb, weight_bytes

BASELINE = plugins.FLOAT_BASELINES[0]


@dataclass
class BenchConfig:
    model: str = "default"
    methods: Sequence[str] = plugins.BENCH_METHODS
    bits: Sequence[QuantSpec] = field(default_factory=lambda: [QuantSpec.parse("w8a8"), QuantSpec.parse("w4a4")])
    batch_sizes: Sequence[int] = (1, 8)
    new_tokens: int = 16
    rounds: int = 5
    threads: int = 1
    task: str = plugins.DEFAULT_PROMPT_TASK
    calib_samples: int = 16
    seed: int = 0
    scope: tuple[Scope, ...] = ALL_SCOPES
    backend: str = "auto"
    rss: bool = True
    ckpt_rss: bool = True  # also each variant loaded from its saved checkpoint in a fresh process (bench_memory)
    embeddings: str = "none"  # --quantize-embeddings for the quantized variants (the float baselines stay float)
    method_options: dict[str, dict] = field(default_factory=dict)
    execution: str = "packed"  # "simulated": keep quantized layers fake-quant (what `harness run` does by default)
    device: str = "cpu"  # cuda: timed with synchronisation, peak CUDA memory instead of the RSS child processes
    # "hadamard" | "random": every quantized variant also built rotated first (`<method>+<rotate>`), timed beside
    # its unrotated twin: the cost of the online Hadamards as a ratio in the same run
    rotate: str = "none"


@dataclass
class Variant:
    """One benchmarked model: a method at one precision, packed where possible."""

    method: str
    bits: str
    execution: str
    adapter: Any
    packing: dict = field(default_factory=dict)
    setup_s: float = 0.0  # quantization + conversion (+ compilation on first call, added when timed)
    source: dict | None = None  # what a fresh process loads to deploy it (`qvlm_harness.bench_memory`)

    @property
    def label(self) -> str:
        return self.method if self.bits == "fp" else f"{self.method} {self.bits}"


# -- building variants --------------------------------------------------------------------------------------------


def split_rotation(variant: str) -> tuple[str, str]:
    """A variant name "<method>[+<rotation>]" -> (method, rotation or "none"), e.g. "rtn+hadamard"."""
    from qvlm_harness.models.rotation import KINDS

    method, plus, rotate = variant.partition("+")
    if plus and rotate not in KINDS:
        raise HarnessError(f"variant {variant!r}: unknown rotation {rotate!r} after '+'; use {' or '.join(KINDS)}")
    return method, rotate if plus else "none"


def variant_specs(cfg: BenchConfig) -> list[tuple[str, QuantSpec]]:
    """(variant, spec) pairs: fixed-precision baselines once, the others once per bit width; fp32 first. A variant
    is a method name, or "<method>+<rotation>" (rotated first); `cfg.rotate` adds the rotated twin of every
    quantized variant right after it."""
    names = [_resolve_variant(m) for m in cfg.methods]
    if BASELINE not in names:
        names.insert(0, BASELINE)  # every ratio needs the FP32 baseline measured in the same run
    if cfg.rotate != "none":  # the rotated twin right after each quantized method (a rotated baseline: by name)
        names = [n for name in names for n in
                 ((name,) if "+" in name or plugins.methods.get(name).fixed_precision else
                  (name, f"{name}+{cfg.rotate}"))]
    out: list[tuple[str, QuantSpec]] = []
    for name in dict.fromkeys(names):
        base_name = split_rotation(name)[0]
        method = plugins.methods.get(base_name)(**cfg.method_options.get(base_name, {}))
        specs = [QuantSpec()] if method.fixed_precision else list(cfg.bits)
        for spec in specs:
            spec = method.canonical_spec(spec)
            reason = method.supports(spec)
            if reason is not None:
                raise HarnessError(f"method {name} does not support {spec.tag} ({reason}); see `harness ls methods`")
            if cfg.execution == "packed" and spec.quantizes_activations and spec.a_granularity == "channel":
                raise HarnessError(f"--bits {spec.tag} with --execution packed: {CHANNEL_ACTIVATIONS_UNPACKABLE}; use "
                                   "--execution simulated or per-token / per-tensor activations")
            out.append((name, spec))
    out.sort(key=lambda p: p[0] != BASELINE)
    return out


def _resolve_variant(name: str) -> str:
    method, rotate = split_rotation(name.strip())
    canonical = plugins.methods.resolve_name(method)
    return canonical if rotate == "none" else f"{canonical}+{rotate}"


def build_variant(base, method_name: str, spec: QuantSpec, cfg: BenchConfig, *, copy_model: bool = True,
                  save_to: Path | None = None) -> Variant:
    """Quantize a copy of `base` (a LlavaAdapter) with the registered method and pack it (unless
    `cfg.execution` is "simulated"); with `save_to`, the quantized model is first saved there as a checkpoint
    (fake-quant, as `harness quantize` writes it) for the fresh-process memory measurement."""
    from qvlm_harness import bench_memory
    from qvlm_harness.models.llava import LlavaAdapter
    from qvlm_harness.quantize import calibration_for, pack, quantize

    t0 = time.perf_counter()
    variant_name = method_name
    method_name, rotate = split_rotation(variant_name)
    method = plugins.methods.get(method_name)(**cfg.method_options.get(method_name, {}))
    model = copy.deepcopy(base.model) if copy_model else base.model
    adapter = LlavaAdapter(model, base.processor, base.name, base.path)
    calibration = calibration_for(method, spec, plugins.tasks.get(cfg.task)(), cfg.calib_samples, cfg.seed)
    quantized = quantize(adapter, method, spec, calibration, scope=cfg.scope, seed=cfg.seed, execution="simulated",
                         kernel_backend=cfg.backend, measure_fp_pass=False, rotate=rotate,
                         embeddings="none" if method.fixed_precision else cfg.embeddings)
    source = None
    if save_to is not None and base.path:
        if method.fixed_precision and rotate == "none":
            source = bench_memory.float_source(base.path, method.compute_dtype or "fp32")
        elif not method.fixed_precision:
            t_save = time.perf_counter()
            folder = bench_memory.save_variant(quantized, method, spec, save_to, base.name, "bench", cfg.scope)
            source = bench_memory.checkpoint_source(folder, cfg.execution, cfg.backend)
            t0 += time.perf_counter() - t_save  # saving is not part of the variant's setup
    if cfg.execution == "packed" and quantized.execution == "simulated":
        pack(quantized, cfg.backend)
    bits = "fp" if spec.is_float else spec.tag
    return Variant(variant_name, bits, quantized.execution, adapter, quantized.report.get("packing", {}),
                   time.perf_counter() - t0, source)


def build_variants(base, pairs: Sequence[tuple[str, QuantSpec]], cfg: BenchConfig, log,
                   save_root: Path | None = None) -> list[Variant]:
    """Every (method, spec) of `pairs` built from copies of `base`, each logged with its packing summary (and
    saved as a checkpoint under `save_root` when given)."""
    variants: list[Variant] = []
    for i, (method, spec) in enumerate(pairs):
        log(f"  building {method} {'fp' if spec.is_float else spec.tag}")
        v = build_variant(base, method, spec, cfg, save_to=None if save_root is None else save_root / f"v{i}")
        if v.packing:
            log(f"    {v.packing['summary']}")
        variants.append(v)
    return variants


def linear_weight_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Bytes the (quantizable) linear layers at `names` hold now, bias excluded, whatever module sits there."""
    total = 0
    for name in names:
        mod = model.get_submodule(name)
        inner = getattr(mod, "weight_storage_bytes", None)
        if callable(inner):
            total += inner(False)
        else:
            total += sum(t.numel() * t.element_size() for n, t in mod.named_parameters() if not n.endswith("bias"))
    return total


# -- timing ----------------------------------------------------------------------------------------------------------


class _Clock:
    """Generation streamer: `put` is called with the prompt, then once per new token; `end` at the end."""

    def __init__(self, on_first_token: Callable[[], None] | None = None, on_end: Callable[[], None] | None = None):
        self.times: list[float] = []
        self.on_first_token, self.on_end = on_first_token, on_end

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 2 and self.on_first_token:
            self.on_first_token()

    def end(self) -> None:
        self.times.append(time.perf_counter())
        if self.on_end:
            self.on_end()


def prompts(cfg: BenchConfig, n: int):
    """`n` requests of the benchmark task (images included), repeated if the task has fewer."""
    task = plugins.tasks.get(cfg.task)()
    samples = task.load("test")
    if not samples:
        raise HarnessError(f"task {cfg.task} has no samples to prompt with")
    reqs = [task.request(samples[i % len(samples)], scoring="generate") for i in range(n)]
    for r in reqs:
        r.kind = "generate"
    return reqs


def generate_once(adapter, batch: dict, new_tokens: int, clock: _Clock) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation forced to `new_tokens` tokens.

    On CUDA the device is synchronised before the start and after the end; in between, HF's streamer receives
    every new token copied to the host (``.cpu()``), a synchronising copy, so the first-token timestamp is one of
    finished work too."""
    device = getattr(adapter, "device", None)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        adapter.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               num_beams=1, streamer=clock, pad_token_id=adapter.tokenizer.pad_token_id)
    sync(device)
    t_end = time.perf_counter()
    t_first = clock.times[1] if len(clock.times) > 2 else t_end
    return t_first - t0, t_end - t_first


def time_variants(variants: Sequence[Variant], cfg: BenchConfig, batch_size: int,
                  log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Median prefill ms and decode tokens/s per variant label, interleaved over `cfg.rounds` rounds; on CUDA also
    ``cuda_work_mb``: how far the allocator's peak rose above what was live while the variant's first timed
    generation ran (activations, KV cache, workspaces; None on the CPU)."""
    reqs = prompts(cfg, batch_size)
    batches = {v.label: v.adapter.encode(reqs) for v in variants}
    prefill: dict[str, list[float]] = {v.label: [] for v in variants}
    decode: dict[str, list[float]] = {v.label: [] for v in variants}
    for v in variants:  # warm-up (first-call allocations, lazy kernel builds, torch.compile)
        t0 = time.perf_counter()
        generate_once(v.adapter, batches[v.label], 2, _Clock())
        v.setup_s += time.perf_counter() - t0
    work_mb: dict[str, float | None] = {}
    for r in range(cfg.rounds):
        for v in variants:
            with PeakDeviceMemory(cfg.device if r == 0 else None) as mem:
                p, d = generate_once(v.adapter, batches[v.label], cfg.new_tokens, _Clock())
            if r == 0:
                work_mb[v.label] = None if mem.peak_mb is None else mem.peak_mb - (mem.start_mb or 0.0)
            prefill[v.label].append(p)
            decode[v.label].append(d)
        log(f"  batch {batch_size}: round {r + 1}/{cfg.rounds} done")
    steps = batch_size * (cfg.new_tokens - 1)
    prompt_len = int(next(iter(batches.values()))["input_ids"].shape[1])
    return {label: {"prefill_ms": 1000 * statistics.median(prefill[label]),
                    "decode_tok_s": steps / statistics.median(decode[label]),
                    "decode_ms_per_step": 1000 * statistics.median(decode[label]) / (cfg.new_tokens - 1),
                    "prompt_tokens": prompt_len, "cuda_work_mb": work_mb.get(label)}
            for label in prefill}


# -- memory in a child process ----------------------------------------------------------------------------------------


def _config_json(cfg: BenchConfig) -> dict:
    d = dict(cfg.__dict__)
    d["bits"] = [b.tag for b in cfg.bits]
    return d


def rss_child_main() -> None:
    """Entry point of the child process (reads its job as JSON on stdin, prints one JSON line)."""
    import json
    import sys

    from qvlm_harness.models.llava import LlavaAdapter, set_threads

    job = json.loads(sys.stdin.read())
    raw = job["cfg"]
    cfg = BenchConfig(**(raw | {"bits": [QuantSpec.parse(b) for b in raw["bits"]], "scope": tuple(raw["scope"])}))
    set_threads(cfg.threads)
    base = LlavaAdapter.load(job["model_path"])
    variant = build_variant(base, job["method"], QuantSpec.parse(job["bits"]), cfg, copy_model=False)
    del base
    gc.collect()
    trimmed = release_free_memory()
    batch = variant.adapter.encode(prompts(cfg, job["batch_size"]))
    before = current_rss_mb()
    with PeakRSS(interval_s=0.005) as rss:
        generate_once(variant.adapter, batch, cfg.new_tokens, _Clock())
    print("RSS_RESULT " + json.dumps({"peak_rss_mb": rss.peak_mb, "rss_before_mb": before, "trimmed": trimmed}))


def release_free_memory() -> bool:
    """Hand the heap pages freed by quantization (the FP32 weights, fake-quant copies) back to the OS.

    glibc keeps freed memory mapped, so without this the RSS of a quantized variant would still count the
    float model it was built from. Returns False where `malloc_trim` does not exist (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def peak_rss(cfg: BenchConfig, model_path: str, method: str, spec: QuantSpec, batch_size: int) -> dict:
    """Peak RSS (MiB) while one variant generates, in a fresh process holding only that variant (quantized from
    the FP32 checkpoint there, the FP32 copy freed before generating)."""
    import json
    import subprocess
    import sys

    job = {"cfg": _config_json(cfg), "model_path": model_path, "method": method,
           "bits": "fp" if spec.is_float else spec.tag, "batch_size": batch_size}
    try:
        out = subprocess.run([sys.executable, "-c", "from qvlm_harness.bench import rss_child_main; rss_child_main()"],
                             input=json.dumps(job), capture_output=True, text=True, timeout=1800,
                             cwd=str(Path(__file__).resolve().parent.parent))
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    for line in out.stdout.splitlines():
        if line.startswith("RSS_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {out.returncode}: {tail[:300]}"}


# -- profile --------------------------------------------------------------------------------------------------------

CATEGORIES = {
    "packed int linear": ("harness_kernels::int_linear", "aten::_int_mm", "aten::_weight_int4pack_mm_for_cpu"),
    "float GEMM": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
}


@dataclass
class DecodeProfile:
    label: str
    steps: int
    wall_ms_per_step: float
    op_ms_per_step: float  # sum of op self times (the rest is Python and framework overhead)
    categories: dict[str, float]  # ms per step
    top: list[tuple[str, int, float]]  # (op, calls per step, self ms per step)

    def to_text(self) -> str:
        lines = [f"{self.label}: {self.wall_ms_per_step:.2f} ms per decode step (mean of {self.steps} steps under "
                 f"the profiler, which adds overhead of its own); op self times {self.op_ms_per_step:.2f} ms, the "
                 f"rest ({self.wall_ms_per_step - self.op_ms_per_step:.2f} ms) is Python/framework time"]
        for cat, ms in self.categories.items():
            lines.append(f"  {cat:<22} {ms:8.2f} ms/step  {100 * ms / self.wall_ms_per_step:5.1f}%")
        lines.append(f"  {'op':<48} {'calls/step':>10} {'self ms/step':>12}")
        lines += [f"  {name[:48]:<48} {calls:>10} {ms:>12.3f}" for name, calls, ms in self.top]
        return "\n".join(lines)


def profile_decode(variant: Variant, cfg: BenchConfig, batch_size: int = 1, top: int = 15) -> DecodeProfile:
    """Profile the decode steps of one generation (from the first new token on) with torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    batch = variant.adapter.encode(prompts(cfg, batch_size))
    prof = profile(activities=[ProfilerActivity.CPU])
    marks: dict[str, float] = {}

    def start() -> None:
        marks["start"] = time.perf_counter()
        prof.start()

    def stop() -> None:
        prof.stop()
        marks["stop"] = time.perf_counter()

    generate_once(variant.adapter, batch, cfg.new_tokens, _Clock(on_first_token=start, on_end=stop))
    steps = cfg.new_tokens - 1
    events = prof.key_averages()
    rows = sorted(((e.key, e.count, e.self_cpu_time_total / 1000.0) for e in events), key=lambda r: -r[2])
    op_ms = sum(ms for _, _, ms in rows) / steps
    cats = {c: sum(ms for k, _, ms in rows if k.startswith(prefixes)) / steps for c, prefixes in CATEGORIES.items()}
    cats["other ops"] = op_ms - sum(cats.values())
    wall = 1000 * (marks["stop"] - marks["start"]) / steps
    cats["Python/framework"] = max(0.0, wall - op_ms)
    return DecodeProfile(variant.label, steps, wall, op_ms, cats,
                         [(k, round(n / steps), ms / steps) for k, n, ms in rows[:top]])


# -- the whole benchmark ----------------------------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, *, profile: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build every variant, time them, measure memory; returns {"rows": [...], "profiles": [...], "env": {...}}."""
    from qvlm_harness.models.llava import LlavaAdapter, set_threads
    from qvlm_harness.plan import check_device, resolve_model

    check_device(cfg.device)
    threads = set_threads(cfg.threads)
    pairs = variant_specs(cfg)
    model_id, model_path = resolve_model(cfg.model)
    on_cuda = is_cuda(cfg.device)
    log(f"bench: model {model_id} on {cfg.device}; {threads} thread(s); {len(pairs)} variants; batch sizes "
        f"{list(cfg.batch_sizes)}; {cfg.new_tokens} new tokens; {cfg.rounds} interleaved rounds")
    if on_cuda and (cfg.rss or cfg.ckpt_rss):
        log("  peak RSS child processes skipped on CUDA (host RSS says nothing about GPU memory); peak CUDA "
            "memory is measured instead")
    base = LlavaAdapter.load(model_path, device=cfg.device)
    lin_names = base.linear_names(cfg.scope)
    fp16_bytes = sum(t.numel() * 2 for t in list(base.model.parameters()) + list(base.model.buffers()))
    fp16_linear = sum(base.model.get_submodule(n).weight.numel() * 2 for n in lin_names)
    save_root = Path(tempfile.mkdtemp(prefix="qvlm-bench-ckpt-")) if cfg.ckpt_rss and not on_cuda else None
    try:
        variants = build_variants(base, pairs, cfg, log, save_root)
        del base
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        return _measure(cfg, variants, pairs, model_id, model_path, lin_names, fp16_bytes, fp16_linear, threads,
                        profile, log)
    finally:
        if save_root is not None:
            shutil.rmtree(save_root, ignore_errors=True)


def _measure(cfg: BenchConfig, variants: list[Variant], pairs, model_id: str, model_path: str, lin_names,
             fp16_bytes: int, fp16_linear: int, threads: int, profile: bool, log) -> dict:
    """Time every variant, measure its memory (in-process and loaded from its checkpoint, or peak CUDA memory on a
    GPU), profile."""
    from qvlm_harness import bench_memory
    from qvlm_harness.kernels import cpu as cpu_kernels

    on_cuda = is_cuda(cfg.device)
    if cfg.backend in ("auto", "cpp") and any(v.execution == "real" for v in variants) and not on_cuda:
        why = cpu_kernels.unavailable_reason()
        log(f"  fused CPU kernel: {'on (VNNI)' if cpu_kernels.has_vnni() else 'on' if not why else 'off: ' + why}")
    rows: list[dict] = []
    for bs in cfg.batch_sizes:
        timing = time_variants(variants, cfg, bs, log)
        ref = timing[variants[0].label]
        ref_bytes = weight_bytes(variants[0].adapter.model, packed=False)
        for v, (method, spec) in zip(variants, pairs, strict=True):
            t = timing[v.label]
            wb = weight_bytes(v.adapter.model, packed=False)
            lb = linear_weight_bytes(v.adapter.model, lin_names)
            row = {"method": v.method, "bits": v.bits, "exec": v.execution, "batch": bs,
                   "prompt_tokens": t["prompt_tokens"], "prefill_ms": t["prefill_ms"],
                   "prefill_x": ref["prefill_ms"] / t["prefill_ms"], "decode_tok_s": t["decode_tok_s"],
                   "decode_x": t["decode_tok_s"] / ref["decode_tok_s"],
                   "e2e_x": (ref["prefill_ms"] + (cfg.new_tokens - 1) * ref["decode_ms_per_step"])
                   / (t["prefill_ms"] + (cfg.new_tokens - 1) * t["decode_ms_per_step"]),
                   "weight_mb": wb / 2**20, "weight_x_fp32": ref_bytes / wb, "weight_x_fp16": fp16_bytes / wb,
                   "linear_mb": lb / 2**20, "linear_x_fp16": fp16_linear / lb, "peak_rss_mb": None,
                   "peak_cuda_mb": None if t["cuda_work_mb"] is None else wb / 2**20 + t["cuda_work_mb"],
                   "setup_s": v.setup_s, "threads": threads,
                   "packed_layers": v.packing.get("converted", 0),
                   "simulated_layers": len(v.packing.get("skipped", {}))}
            if cfg.rss and not on_cuda:
                log(f"  peak RSS: {v.label} batch {bs} (child process)")
                r = peak_rss(cfg, model_path, method, spec, bs)
                row["peak_rss_mb"] = r.get("peak_rss_mb")
                if "error" in r:
                    log(f"    failed: {r['error']}")
            if cfg.ckpt_rss and not on_cuda and v.source is not None:
                log(f"  peak RSS: {v.label} batch {bs} loaded from its checkpoint (child process)")
                r = bench_memory.checkpoint_rss(v.source, _config_json(cfg), bs)
                row["ckpt_rss_mb"] = r.get("ckpt_rss_mb")
                row["resident_mb"] = r["resident_bytes"] / 2**20 if "resident_bytes" in r else None
                row["decode_read_mb"] = r["decode_bytes"] / 2**20 if "decode_bytes" in r else None
                if "error" in r:
                    log(f"    failed: {r['error']}")
            rows.append(row)
    for row in rows:
        ref = next((r for r in rows if r["batch"] == row["batch"] and r["method"] == BASELINE), {})
        for key, ratio in (("peak_rss_mb", "rss_x"), ("ckpt_rss_mb", "ckpt_rss_x"), ("resident_mb", "resident_x"),
                           ("decode_read_mb", "decode_read_x"), ("peak_cuda_mb", "cuda_x")):
            row[ratio] = ref[key] / row[key] if ref.get(key) and row.get(key) else None
        row["resident_x_fp16"] = fp16_bytes / 2**20 / row["resident_mb"] if row.get("resident_mb") else None
    profiles = []
    if profile:
        for v in variants:
            log(f"  profiling one decode run: {v.label}")
            profiles.append(profile_decode(v, cfg, batch_size=1))
    env = {"model": model_id, "threads": threads, "torch": torch.__version__, "new_tokens": cfg.new_tokens,
           "rounds": cfg.rounds, "backend": cfg.backend, "task": cfg.task, "device": cfg.device,
           "accelerator": torch.cuda.get_device_name(torch.device(cfg.device)) if on_cuda else None,
           "timing": "synchronised wall clock (CUDA)" if on_cuda else "wall clock",
           "fused_kernel": "not used on CUDA" if on_cuda else cpu_kernels.unavailable_reason() or "on"}
    return {"rows": rows, "profiles": profiles, "env": env}
