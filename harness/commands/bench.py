"""`harness bench`: prefill latency, decode tokens/s, weight bytes and peak RSS of packed quantized models,
each as a ratio to the FP32 baseline measured in the same run (see `qvlm_harness.bench`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qvlm_harness import plugins
from qvlm_harness.commands.common import BITS_HELP, csv_list, int_list, method_options, scope_list
from qvlm_harness.config import ALL_SCOPES, QuantSpec
from qvlm_harness.errors import HarnessError

COLUMNS = {"method": "Method", "bits": "Bits", "exec": "Exec", "batch": "Batch", "prefill_ms": "Prefill ms",
           "prefill_x": "Prefill x", "decode_tok_s": "Decode tok/s", "decode_x": "Decode x", "e2e_x": "E2E x",
           "weight_mb": "Weights MB", "weight_x_fp32": "W x fp32", "weight_x_fp16": "W x fp16",
           "linear_mb": "Linear MB", "linear_x_fp16": "Lin x fp16", "peak_rss_mb": "Peak RSS MB", "rss_x": "RSS x"}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="real latency and memory of packed quantized models vs the FP32 baseline")
    p.add_argument("--model", default="default", help="'default', 'tiny', a Llava checkpoint folder or a hub id")
    p.add_argument("--methods", default=",".join(plugins.BENCH_METHODS),
                   help=f"comma list; {plugins.FLOAT_BASELINES[0]} is always added as the baseline")
    p.add_argument("--bits", default="w8a8,w4a4", help=f"for the quantized methods: {BITS_HELP}")
    p.add_argument("--batch-sizes", type=int_list, default=(1, 8), help="comma list, e.g. 1,8")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt (forced to full length)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians are reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed; printed)")
    p.add_argument("--task", default=plugins.DEFAULT_PROMPT_TASK,
                   help="task whose test prompts (with images) are generated from")
    p.add_argument("--calib-samples", type=int, default=16, help="for methods that calibrate")
    p.add_argument("--quantize", type=scope_list, default=ALL_SCOPES, dest="scope",
                   help="parts to quantize: vision,projector,lm (default all)")
    p.add_argument("--kernel-backend", choices=["auto", "cpp", "torch", "compile"], default="auto",
                   help="integer linear layers: fused CPU kernel (auto/cpp), plain torch ops, or torch.compile")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE")
    p.add_argument("--no-rss", action="store_true", help="skip the per-variant peak RSS child processes")
    p.add_argument("--profile", action="store_true", help="also profile the decode steps and write the top ops")
    p.add_argument("--output", type=Path, default=Path("results/bench"), help="folder for CSV, Markdown, plot")
    p.add_argument("--seed", type=int, default=0)


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness.bench import BenchConfig, run_bench
    from qvlm_harness.writable import check_output_folder

    check_output_folder(args.output, "--output")  # written after every variant was timed

    if args.new_tokens < 2:
        raise HarnessError("--new-tokens must be at least 2 (one prefill token and at least one decode step)")
    if args.rounds < 1 or args.threads < 1 or any(b < 1 for b in args.batch_sizes):
        raise HarnessError("--rounds, --threads and --batch-sizes must be positive")
    cfg = BenchConfig(model=args.model, methods=csv_list(args.methods), bits=QuantSpec.parse_list(args.bits),
                      batch_sizes=tuple(args.batch_sizes), new_tokens=args.new_tokens, rounds=args.rounds,
                      threads=args.threads, task=args.task, calib_samples=args.calib_samples, seed=args.seed,
                      scope=tuple(args.scope), backend=args.kernel_backend, rss=not args.no_rss,
                      method_options=method_options(args.method_option))
    result = run_bench(cfg, profile=args.profile, log=lambda m: print(m, file=sys.stderr))
    folder = args.output / time.strftime("%Y%m%d-%H%M%S")
    written = write_outputs(result, folder)
    print(render(result))
    print(f"\nwritten: {', '.join(str(p) for p in written)}")
    return 0


def table(rows: list[dict]):
    import pandas as pd

    df = pd.DataFrame(rows)
    return df[[c for c in COLUMNS if c in df.columns]].rename(columns=COLUMNS)


def render(result: dict) -> str:
    env = result["env"]
    head = (f"model {env['model']}, {env['threads']} thread(s), torch {env['torch']}, {env['new_tokens']} new tokens, "
            f"medians of {env['rounds']} interleaved rounds; kernel backend {env['backend']} "
            f"(fused CPU kernel: {env['fused_kernel']})")
    notes = ("x = ratio to fp32 in this run (>1 is better: faster, smaller). E2E = prefill + all decode steps. "
             "W x fp16 / Lin x fp16: fp16 size of the whole model / of the quantizable linear layers divided by "
             "the bytes held. Exec 'real' = packed integer kernels; 'simulated' layers would be fake-quant.")
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
