"""Do per-sample outputs change with batch size or thread count? Count them, per method, bits and execution.

For each (method, bits, execution) the model is quantized once; then a seeded subset of each task is answered
through the task's own `answer` (the runner's path) at every batch size and thread count, and each configuration's
per-sample outputs are compared with the first one's (the first batch size and thread count given: batch 1,
1 thread by default): generated texts that differ, chosen answers (the task's scored `pred`) that differ, and the
largest absolute difference of any option log-probability. Samples/s are printed with their ratio to that first
configuration and with samples per CPU-second of this process (the work done, less sensitive than wall time to
other jobs on shared cores; at several threads it includes their spinning), and the machine's load average before
and after. The `key` column is what `qvlm_harness.models.invariance.invariance_key` says may still vary there.

    python bench/invariance.py --model default --methods fp32,bf16,rtn --bits w8a8,w4a4 \\
        --execution simulated,packed --tasks sqa,hm --limit 32 --batch-sizes 1,4,16 --threads 1,2
    python bench/invariance.py --model tiny --methods fp32,rtn --tasks sqa,sqa:loglik,hm --limit 8 --csv out.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from qvlm_harness import plugins
from qvlm_harness.commands.common import method_options
from qvlm_harness.config import QuantSpec
from qvlm_harness.models.invariance import invariance_key
from qvlm_harness.models.llava import LlavaAdapter, set_threads
from qvlm_harness.quantize import calibration_for, quantize
from qvlm_harness.task import Request, Response, Sample, Task


@dataclass
class Outcome:
    """One configuration's comparison with the reference configuration of the same model."""

    method: str
    bits: str
    execution: str
    dtype: str
    batch_size: int
    threads: int
    samples: int
    text_differs: int
    choice_differs: int
    max_logprob_diff: float
    samples_per_s: float
    speed_x: float
    samples_per_cpu_s: float
    key: str


@dataclass
class TaskRun:
    task: Task
    samples: list[Sample]
    requests: list[Request]


def parse_list(text: str, kind=str) -> list:
    return [kind(p.strip()) for p in text.split(",") if p.strip()]


def task_runs(names: list[str], limit: int | None, seed: int, max_new_tokens: int) -> list[TaskRun]:
    """`name` or `name:scoring`; the subset is the runner's (same seed, same sample choice)."""
    runs = []
    for item in names:
        name, _, scoring = item.partition(":")
        task = plugins.tasks.get(name)()
        scoring = scoring or task.scoring_modes[0]
        samples = task.load("test")
        if limit is not None and limit < len(samples):
            keep = set(random.Random(f"limit-{seed}").sample(range(len(samples)), limit))
            samples = [x for i, x in enumerate(samples) if i in keep]
        requests = [task.request(x, scoring=scoring) for x in samples]
        for r in requests:
            if r.kind == "generate":
                r.max_new_tokens = max_new_tokens
        runs.append(TaskRun(task, samples, requests))
    return runs


def answer_all(adapter: LlavaAdapter, runs: list[TaskRun], batch_size: int) -> list[tuple[Response, dict]]:
    """Every task's requests through the task's `answer`, with each response's scored record."""
    out = []
    for run in runs:
        responses = run.task.answer(adapter, run.requests, batch_size=batch_size)
        out += [(r, run.task.score(x, r)) for x, r in zip(run.samples, responses, strict=True)]
    return out


def compare(reference: list[tuple[Response, dict]], other: list[tuple[Response, dict]]) -> tuple[int, int, float]:
    """(texts that differ, chosen answers that differ, max |option log-prob difference|)."""
    texts = choices = 0
    worst = 0.0
    for (ra, sa), (rb, sb) in zip(reference, other, strict=True):
        texts += ra.text != rb.text
        choices += sa.get("pred", ra.text) != sb.get("pred", rb.text)
        for (a, _), (b, _) in zip(ra.option_logprobs, rb.option_logprobs, strict=True):
            worst = max(worst, abs(a - b))
    return texts, choices, worst


def quantized_model(model_path: str, method_name: str, spec: QuantSpec, execution: str, calib: Task,
                    calib_samples: int, seed: int, options: dict | None = None) -> LlavaAdapter:
    """A fresh model quantized through the harness's one entry point (`qvlm_harness.quantize.quantize`)."""
    adapter = LlavaAdapter.load(model_path)
    method = plugins.methods.get(method_name)(**(options or {}))
    calibration = calibration_for(method, spec, calib, calib_samples, seed)
    quantize(adapter, method, spec, calibration, seed=seed, execution=execution, measure_fp_pass=False)
    return adapter


def measure(model_path: str, methods: list[str], bits: list[QuantSpec], executions: list[str], runs: list[TaskRun],
            batch_sizes: list[int], threads: list[int], *, seed: int = 0, calib_samples: int = 16,
            options: dict | None = None, log=print) -> list[Outcome]:
    """All configurations; the first (batch size, threads) pair is each model's reference."""
    before = torch.get_num_threads()
    n = sum(len(r.requests) for r in runs)
    outcomes: list[Outcome] = []
    try:
        for method_name in methods:
            method = plugins.methods.get(method_name)(**(options or {}).get(method_name, {}))
            specs = [QuantSpec()] if method.fixed_precision else [b for b in bits if method.supports(b) is None]
            for spec in specs:
                for execution in (["simulated"] if spec.is_float else executions):
                    adapter = quantized_model(model_path, method_name, spec, execution, runs[0].task,
                                              calib_samples, seed, (options or {}).get(method_name))
                    dtype = str(adapter.dtype).replace("torch.", "")
                    set_threads(threads[0])  # warm-up (kernel builds, first-call allocations) outside the timings
                    answer_all(adapter, [TaskRun(r.task, r.samples[:2], r.requests[:2]) for r in runs], 2)
                    reference, ref_speed = None, None
                    for t in threads:
                        for b in batch_sizes:
                            set_threads(t)
                            t0, c0 = time.perf_counter(), time.process_time()
                            got = answer_all(adapter, runs, b)
                            speed = n / (time.perf_counter() - t0)
                            cpu_speed = n / max(time.process_time() - c0, 1e-9)
                            if reference is None:
                                reference, ref_speed = got, speed
                            texts, choices, worst = compare(reference, got)
                            key = invariance_key(spec, execution, adapter.dtype, b, t)
                            outcomes.append(Outcome(method_name, "fp" if spec.is_float else spec.tag, execution,
                                                    dtype, b, t, n, texts, choices, worst, speed,
                                                    speed / ref_speed, cpu_speed, ",".join(key) or "-"))
                            log(format_row(outcomes[-1]))
                    del adapter
    finally:
        torch.set_num_threads(before)
    return outcomes


HEADER = ("| method | bits | exec | dtype | batch | threads | samples | text != | choice != | max abs dlogp "
          "| samples/s | x ref | samples/cpu-s | key |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(o: Outcome) -> str:
    return (f"| {o.method} | {o.bits} | {o.execution} | {o.dtype} | {o.batch_size} | {o.threads} | {o.samples} "
            f"| {o.text_differs} | {o.choice_differs} | {o.max_logprob_diff:.2e} | {o.samples_per_s:.2f} "
            f"| {o.speed_x:.2f} | {o.samples_per_cpu_s:.2f} | {o.key} |")


def main(argv: list[str] | None = None) -> list[Outcome]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default, tiny, or a Llava checkpoint folder")
    ap.add_argument("--methods", default="fp32,rtn")
    ap.add_argument("--bits", default="w8a8,w4a4")
    ap.add_argument("--execution", default="simulated", help="simulated,packed")
    ap.add_argument("--tasks", default="sqa,hm", help="task names, each optionally with :scoring (sqa:loglik)")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="as `harness run` (repeatable), e.g. aespa.num_iters=50")
    args = ap.parse_args(argv)

    target = plugins.models.get(args.model) if args.model in plugins.models else args.model
    model_path = str(target() if callable(target) else target)
    runs = task_runs(parse_list(args.tasks), args.limit, args.seed, args.max_new_tokens)
    print(f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}; model {args.model}; "
          f"{sum(len(r.requests) for r in runs)} requests ({args.tasks})", flush=True)
    print(HEADER, flush=True)
    outcomes = measure(model_path, parse_list(args.methods), QuantSpec.parse_list(args.bits),
                       parse_list(args.execution), runs, parse_list(args.batch_sizes, int),
                       parse_list(args.threads, int), seed=args.seed, calib_samples=args.calib_samples,
                       options=method_options(args.method_option), log=lambda line: print(line, flush=True))
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(outcomes[0])))
            writer.writeheader()
            writer.writerows(asdict(o) for o in outcomes)
    return outcomes


if __name__ == "__main__":
    main()
