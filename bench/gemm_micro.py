"""Per-layer GEMM micro-benchmark at the embedded default model's shapes.

For each (K x N, M) it times, in interleaved rounds (median per call), an fp32 and a bf16 `F.linear`, and the
packed layers for each requested bit width and kernel backend, and prints each as a ratio to fp32 and bf16
measured in the same run. The thread count is fixed and printed.

    python bench/gemm_micro.py --threads 1 --bits w8a8,w4a4 --m 1,64
    python bench/gemm_micro.py --backends torch,cpp,compile --csv results/bench/gemm_micro.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.kernels import cpu as cpu_kernels
from qvlm_harness.kernels.convert import pack_qlinear
from qvlm_harness.kernels.linear import IntLinear
from qvlm_harness.kernels.timing import round_samples
from qvlm_harness.quant import QLinear

DEFAULT_SHAPES = "576x576,576x1536,1536x576,384x384,384x1536,1536x384"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        k, _, n = part.strip().partition("x")
        out.append((int(k), int(n)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of KxN (in x out features)")
    ap.add_argument("--m", default="1,64", help="comma list of row counts (tokens)")
    ap.add_argument("--bits", default="w8a8,w6a6,w4a4,w4a16")
    ap.add_argument("--backends", default="torch,cpp", help="IntLinear backends: torch, cpp, compile")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--csv", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backends = [b for b in args.backends.split(",") if b]
    if "cpp" in backends and not cpu_kernels.available():
        print(f"fused CPU kernel unavailable ({cpu_kernels.unavailable_reason()}); skipping backend cpp")
        backends.remove("cpp")
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} "
          f"vnni={cpu_kernels.has_vnni() if 'cpp' in backends else 'n/a'}")
    rows = []
    for k, n in parse_shapes(args.shapes):
        lin = nn.Linear(k, n, bias=False)
        w32, w16 = lin.weight.detach(), lin.weight.detach().bfloat16()
        layers: dict[str, nn.Module] = {}
        compile_s: dict[str, float] = {}
        for tag in [b for b in args.bits.split(",") if b]:
            spec = QuantSpec.parse(tag)
            q = QLinear.from_linear(lin, spec)
            for be in backends if spec.quantizes_activations else ["-"]:
                layers[f"{tag}/{be}"] = pack_qlinear(q, backend="torch" if be == "-" else be)
        for m in [int(v) for v in args.m.split(",")]:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            fns = {"fp32": lambda x=x, w=w32: F.linear(x, w), "bf16": lambda xb=xb, w=w16: F.linear(xb, w)}
            for name, layer in layers.items():
                if isinstance(layer, IntLinear) and layer.backend == "compile" and name not in compile_s:
                    t0 = time.perf_counter()
                    layer(x)
                    compile_s[name] = time.perf_counter() - t0
                fns[name] = lambda layer=layer, x=x: layer(x)
            with torch.inference_mode():
                samples = round_samples(fns, rounds=args.rounds, calls=args.calls)
            med = {name: statistics.median(v) for name, v in samples.items()}
            best = {name: min(v) for name, v in samples.items()}
            for name, sec in med.items():
                rows.append({"K": k, "N": n, "M": m, "variant": name, "us": 1e6 * sec, "us_min": 1e6 * best[name],
                             "x_vs_fp32": med["fp32"] / sec, "x_vs_bf16": med["bf16"] / sec,
                             "min_x_vs_fp32": best["fp32"] / best[name], "min_x_vs_bf16": best["bf16"] / best[name]})
        if compile_s:
            print(f"{k}x{n}: torch.compile first call " + ", ".join(f"{n_} {s:.1f}s" for n_, s in compile_s.items()))
    print(f"\nmedian (and best) of {args.rounds} interleaved rounds of {args.calls} calls\n"
          "| K x N | M | variant | us/call | vs fp32 | vs bf16 | best us | best vs fp32 | best vs bf16 |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']}x{r['N']} | {r['M']} | {r['variant']} | {r['us']:.1f} | {r['x_vs_fp32']:.2f}x | "
              f"{r['x_vs_bf16']:.2f}x | {r['us_min']:.1f} | {r['min_x_vs_fp32']:.2f}x | {r['min_x_vs_bf16']:.2f}x |")
    if args.csv:
        import csv

        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        print(f"\nwrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
