"""`harness bench`: prefill latency, decode tokens/s, weight bytes and peak RSS of packed quantized models,
each as a ratio to the FP32 baseline measured in the same run (see `qvlm_harness.bench`); with `--throughput`,
evaluation samples/s through the runner's path against the machine's own limit (see `qvlm_harness.throughput`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qvlm_harness import plugins
from qvlm_harness.commands.common import (
    BITS_HELP,
    add_embeddings_argument,
    add_rotate_argument,
    csv_list,
    int_list,
    method_options,
    scope_list,
)
from qvlm_harness.config import ALL_SCOPES, QuantSpec
from qvlm_harness.errors import HarnessError

COLUMNS = {"method": "Method", "bits": "Bits", "exec": "Exec", "batch": "Batch", "prefill_ms": "Prefill ms",
           "prefill_x": "Prefill x", "decode_tok_s": "Decode tok/s", "decode_x": "Decode x", "e2e_x": "E2E x",
           "weight_mb": "Weights MB", "weight_x_fp32": "W x fp32", "weight_x_fp16": "W x fp16",
           "linear_mb": "Linear MB", "linear_x_fp16": "Lin x fp16", "peak_rss_mb": "Peak RSS MB", "rss_x": "RSS x",
           "ckpt_rss_mb": "Ckpt RSS MB", "ckpt_rss_x": "Ckpt RSS x", "resident_mb": "Resident MB",
           "resident_x_fp16": "Res x fp16", "decode_read_mb": "Decode read MB",
           "peak_cuda_mb": "Peak CUDA MB", "cuda_x": "CUDA x"}

CUDA_COLUMNS = ("peak_cuda_mb", "cuda_x")

THROUGHPUT_COLUMNS = {
    "method": "Method", "bits": "Bits", "exec": "Exec", "batch": "Batch", "samples_per_s": "Samples/s",
    "x_fp32": "x fp32", "prompt_tokens_per_s": "Prompt tok/s", "generated_tokens_per_s": "Gen tok/s",
    "gflop_per_sample": "GFLOP/sample", "rate_gflops": "GEMM GFLOP/s", "limit_samples_per_s": "Limit samples/s",
    "efficiency": "Efficiency", "cpu_efficiency": "CPU eff.", "accuracy": "Acc", "cpu_share": "CPU share",
    "load_1min": "Load"}
LATENCY_DEFAULTS = {"task": plugins.DEFAULT_PROMPT_TASK, "rounds": 5, "batch_sizes": (1, 8)}
THROUGHPUT_DEFAULTS = {"task": plugins.DEFAULT_CALIB_TASK, "rounds": 3, "batch_sizes": (1, 16), "samples": 64,
                       "scoring": "generate", "split": "test"}
THROUGHPUT_ONLY = ("samples", "scoring", "data_dir", "split")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="real latency and memory of packed quantized models vs the FP32 baseline; "
                                     "--throughput: evaluation speed against the machine's limit")
    p.add_argument("--model", default="default", help="'default', 'tiny', a Llava checkpoint folder or a hub id")
    p.add_argument("--methods", default=",".join(plugins.BENCH_METHODS),
                   help=f"comma list; {plugins.FLOAT_BASELINES[0]} is always added as the baseline")
    p.add_argument("--bits", default="w8a8,w4a4", help=f"for the quantized methods: {BITS_HELP}")
    p.add_argument("--batch-sizes", type=int_list, default=None, help="comma list (default 1,8; --throughput 1,16)")
    p.add_argument("--new-tokens", type=int, default=16,
                   help="tokens generated per prompt (forced to full length); with --throughput the cap on each "
                        "answer, which stops at its end as in `harness run --max-new-tokens`")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds, medians reported (default 5; --throughput 3)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed; printed)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N: on CUDA, timing synchronises the device and peak CUDA memory "
                        "(allocator high-water mark) replaces the peak-RSS child processes")
    p.add_argument("--task", default=None,
                   help=f"task the prompts come from (default {plugins.DEFAULT_PROMPT_TASK}; --throughput: the task "
                        f"evaluated, default {plugins.DEFAULT_CALIB_TASK})")
    p.add_argument("--throughput", action="store_true",
                   help="evaluate --samples task samples per variant through the runner's path and report "
                        "samples/s, tokens/s and the efficiency against this machine's measured GEMM limit")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="--throughput: samples evaluated per variant and batch size (default 64; the seeded "
                        "subset `harness run --limit N` evaluates)")
    p.add_argument("--scoring", default=None, help="--throughput: generate (default) or loglik, as `harness run`")
    p.add_argument("--data-dir", type=Path, default=None, help="--throughput: the task's official data folder")
    p.add_argument("--split", default=None, help="--throughput: split to evaluate (default: the task's test split)")
    p.add_argument("--execution", default="packed",
                   help="packed (default): quantized layers on real integer kernels; simulated: fake-quant")
    p.add_argument("--calib-samples", type=int, default=16, help="for methods that calibrate")
    p.add_argument("--quantize", type=scope_list, default=ALL_SCOPES, dest="scope",
                   help="parts to quantize: vision,projector,lm (default all)")
    p.add_argument("--kernel-backend", choices=["auto", "cpp", "torch", "compile"], default="auto",
                   help="integer linear layers: fused CPU kernel (auto/cpp), plain torch ops, or torch.compile")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE")
    add_embeddings_argument(p)
    add_rotate_argument(p, "also time every quantized variant rotated first (QuaRot, online Hadamards as FWHTs), as "
                        "<method>+<rotate> beside its unrotated twin; a variant name such as rtn+hadamard in "
                        "--methods does the same for one method")
    p.add_argument("--no-rss", action="store_true",
                   help="skip the per-variant peak RSS child processes that quantize from the FP32 checkpoint")
    p.add_argument("--no-ckpt-rss", action="store_true",
                   help="skip saving each variant and measuring it loaded from that checkpoint in a fresh process")
    p.add_argument("--profile", action="store_true",
                   help="also profile the decode steps and write the top ops; with --throughput, where an "
                        "evaluation pass spends its time and how much of the executed work was needed")
    p.add_argument("--output", type=Path, default=Path("results/bench"), help="folder for CSV, Markdown, plot")
    p.add_argument("--seed", type=int, default=0)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a HarnessError, so the CLI prints one line and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise HarnessError(f"expected a positive whole number, got {text!r} (e.g. --samples 64)") from None
    if value < 1:
        raise HarnessError(f"expected a positive whole number, got {text!r} (e.g. --samples 64)")
    return value


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the options whose default depends on the mode, and reject throughput-only options without it."""
    if not args.throughput:
        given = [f"--{name.replace('_', '-')}" for name in THROUGHPUT_ONLY if getattr(args, name) is not None]
        if given:
            raise HarnessError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --throughput; "
                               "add --throughput or drop them")
    for name, value in (THROUGHPUT_DEFAULTS if args.throughput else LATENCY_DEFAULTS).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def bench_config(args: argparse.Namespace):
    from qvlm_harness.bench import BenchConfig

    resolve_defaults(args)
    least_tokens = 1 if args.throughput else 2
    if args.new_tokens < least_tokens:
        raise HarnessError("--new-tokens must be at least 2 (one prefill token and at least one decode step)"
                           if least_tokens == 2 else "--new-tokens must be at least 1")
    if args.rounds < 1 or args.threads < 1 or any(b < 1 for b in args.batch_sizes):
        raise HarnessError("--rounds, --threads and --batch-sizes must be positive")
    if not args.batch_sizes:
        raise HarnessError("--batch-sizes needs at least one size, e.g. --batch-sizes 1,16")
    if args.execution not in ("packed", "simulated"):
        raise HarnessError(f"--execution takes packed or simulated, got {args.execution!r}")
    if args.throughput and str(args.device).strip().lower() != "cpu":
        raise HarnessError("--throughput measures against this CPU's own GEMM limit; drop --device or --throughput")
    if args.throughput and args.scoring not in ("generate", "loglik"):
        raise HarnessError(f"--scoring takes generate or loglik, got {args.scoring!r}")
    return BenchConfig(model=args.model, methods=csv_list(args.methods), bits=QuantSpec.parse_list(args.bits),
                       batch_sizes=tuple(args.batch_sizes), new_tokens=args.new_tokens, rounds=args.rounds,
                       threads=args.threads, task=args.task, calib_samples=args.calib_samples, seed=args.seed,
                       scope=tuple(args.scope), backend=args.kernel_backend, rss=not args.no_rss,
                       ckpt_rss=not args.no_ckpt_rss, embeddings=args.embeddings,
                       method_options=method_options(args.method_option), execution=args.execution,
                       device=args.device, rotate=args.rotate)


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness.plan import check_device, check_model_source
    from qvlm_harness.writable import check_output_folder

    cfg = bench_config(args)
    check_device(cfg.device)
    check_model_source(cfg.model)
    check_output_folder(args.output, "--output")  # written after every variant was timed
    log = lambda m: print(m, file=sys.stderr)
    folder = args.output / time.strftime("%Y%m%d-%H%M%S")
    if args.throughput:
        from qvlm_harness.throughput import ThroughputConfig, run_throughput

        tcfg = ThroughputConfig(samples=args.samples, scoring=args.scoring, data_dir=args.data_dir, split=args.split)
        result = run_throughput(cfg, tcfg, profile=args.profile, log=log)
        written = write_throughput_outputs(result, folder)
        print(render_throughput(result))
    else:
        from qvlm_harness.bench import run_bench

        result = run_bench(cfg, profile=args.profile, log=log)
        written = write_outputs(result, folder)
        print(render(result))
    print(f"\nwritten: {', '.join(str(p) for p in written)}")
    return 0


def table(rows: list[dict]):
    import pandas as pd

    df = pd.DataFrame(rows)
    cuda_only = [c for c in CUDA_COLUMNS if c in df.columns and df[c].isna().all()]  # CPU runs: no such columns
    return df[[c for c in COLUMNS if c in df.columns and c not in cuda_only]].rename(columns=COLUMNS)


def render(result: dict) -> str:
    env = result["env"]
    where = f" on {env['device']} ({env['accelerator']})" if env.get("accelerator") else ""
    head = (f"model {env['model']}{where}, {env['threads']} thread(s), torch {env['torch']}, "
            f"{env['new_tokens']} new tokens, "
            f"medians of {env['rounds']} interleaved rounds; kernel backend {env['backend']} "
            f"(fused CPU kernel: {env['fused_kernel']})")
    notes = ("x = ratio to fp32 in this run (>1 is better: faster, smaller). E2E = prefill + all decode steps. "
             "W x fp16 / Lin x fp16: fp16 size of the whole model / of the quantizable linear layers divided by "
             "the bytes held. Exec 'real' = packed integer kernels; 'simulated' layers would be fake-quant. "
             "Peak RSS: a fresh process that quantizes from the FP32 checkpoint, then generates (its RSS while "
             "generating). Ckpt RSS: a fresh process that loads the variant's saved checkpoint as `harness eval "
             "--execution packed` does (straight into packed modules) and generates once: its lifetime peak "
             "(VmHWM, loading included). Resident MB: the distinct tensor storages that loaded model holds; "
             "Res x fp16: the fp16 model's bytes divided by it. Decode read MB: the weight bytes one decode step "
             "reads (language model, LM head, one embedding row).")
    out = [head, "", table(result["rows"]).to_markdown(index=False, floatfmt=".2f", missingval="-"), "", notes]
    for prof in result["profiles"]:
        out += ["", "```", prof.to_text(), "```"]
    return "\n".join(out)


def write_outputs(result: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    df = table(result["rows"])
    paths = [folder / "bench.csv", folder / "bench.md", folder / "bench.json"]
    df.to_csv(paths[0], index=False)
    paths[1].write_text(render(result) + "\n")
    paths[2].write_text(json.dumps({"env": result["env"], "rows": result["rows"],
                                    "profiles": [p.__dict__ for p in result["profiles"]]}, indent=1, default=str))
    for prof in result["profiles"]:
        p = folder / f"profile_{prof.label.replace(' ', '_')}.txt"
        p.write_text(prof.to_text() + "\n")
        paths.append(p)
    paths.append(plot(result["rows"], folder / "bench.png"))
    return paths


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(f"{r['method']} {r['bits']}".replace(" fp", "") for r in rows))
    metrics = [("prefill_x", "prefill speed-up"), ("decode_x", "decode speed-up"), ("weight_x_fp32", "weights smaller")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    width = 0.8 / len(batches)
    for ax, (key, title) in zip(axes[0], metrics, strict=True):
        for i, b in enumerate(batches):
            vals = [next((r[key] for r in rows if r["batch"] == b and f"{r['method']} {r['bits']}".replace(" fp", "")
                          == lab), 0) or 0 for lab in labels]
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=f"batch {b}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(labels))], labels, rotation=30,
                      ha="right", fontsize=8)
        ax.set_title(f"{title} vs fp32")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- --throughput -----------------------------------------------------------------------------------------------------


def render_throughput(result: dict) -> str:
    """The throughput table, a table of the GEMM rates behind each limit, the notes and any profiles."""
    import pandas as pd

    env = result["env"]
    load_b, load_a = env["loadavg_before"], env["loadavg_after"]
    head = (f"model {env['model']}, {env['threads']} thread(s) of {env['cores']} cores ({env['cpu']}), torch "
            f"{env['torch']}; {env['samples']} {env['task']} {env['split']} samples ({env['scoring']}, at most "
            f"{env['max_new_tokens']} new tokens), mean prompt {env['mean_prompt_tokens']:.0f} tokens, "
            f"{100 * env['image_share']:.0f}% with an image; medians of {env['rounds']} rounds, interleaved in "
            f"slices of {env['slice']} samples; "
            f"execution {env['execution']}, kernel backend {env['backend']} (fused CPU kernel: {env['fused_kernel']}); "
            f"load average {load_b[0]:.2f}/{load_b[1]:.2f}/{load_b[2]:.2f} before, "
            f"{load_a[0]:.2f}/{load_a[1]:.2f}/{load_a[2]:.2f} after")
    df = pd.DataFrame(result["rows"])
    main = df[[c for c in THROUGHPUT_COLUMNS if c in df.columns]].rename(columns=THROUGHPUT_COLUMNS)
    main = main.map(lambda v: _figure(v) if isinstance(v, float) else v)
    rates = []
    for row in result["rows"]:
        entry = {"Method": row["method"], "Bits": row["bits"], "Batch": row["batch"]}
        for part, gflops in row["gemm_gflops"].items():
            entry[f"{part} GFLOP/s"] = f"{gflops:.1f} {row['gemm_dtypes'][part]} (M={row['gemm_rows'][part]})"
        rates.append(entry)
    notes = ("Samples/s: the N samples through the runner's path (requests, task.answer, scoring) over the pass's "
             "wall time. GFLOP/sample: what each answer needs (real tokens, no padding; LM attention causal). GEMM "
             "GFLOP/s: the dense GEMM rate this machine reached at the variant's dtypes, these threads and the "
             "batch's token counts (M), measured before each slice, per part of the model (second table). Limit = "
             "that rate / GFLOP per sample; Efficiency = Samples/s / Limit. x fp32: ratio to fp32 at the same batch "
             "size in this run. CPU eff.: the same in process CPU time (GEMM CPU-time rate vs the evaluation's CPU "
             "time; not lowered by waiting for a core). CPU share: process CPU time / (wall x threads); below 1 "
             "when other jobs hold the cores. Load: the 1-minute load average when the slices started.")
    align = ["left" if c in ("Method", "Bits", "Exec") else "right" for c in main.columns]
    out = [head, "", main.to_markdown(index=False, missingval="-", disable_numparse=True, colalign=align), "",
           pd.DataFrame(rates).to_markdown(index=False, missingval="-"), "", notes]
    for prof in result["profiles"]:
        out += ["", "```", prof.to_text(), "```"]
    return "\n".join(out)


def _figure(v: float) -> str:
    """Three significant figures without exponents (1540, 46.2, 0.0279)."""
    if v != v:
        return "-"
    if v == 0 or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if abs(v) >= 0.001 else f"{v:.2e}"


def write_throughput_outputs(result: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "throughput.json", folder / "throughput.md"]
    paths[0].write_text(json.dumps({"env": result["env"], "rows": result["rows"],
                                    "profiles": [p.__dict__ for p in result["profiles"]]}, indent=1, default=str))
    paths[1].write_text(render_throughput(result) + "\n")
    for prof in result["profiles"]:
        p = folder / f"profile_throughput_{prof.label.replace(' ', '_')}_b{prof.batch_size}.txt"
        p.write_text(prof.to_text() + "\n")
        paths.append(p)
    return paths
