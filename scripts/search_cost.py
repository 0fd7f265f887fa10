"""Search cost of calibration-based methods as FP-pass multiples, with the machine's load beside each number.

    .venv/bin/python scripts/search_cost.py --methods gptq,zeroquant-v2,smoothquant,awq --bits w4a16,w4a4

For every (method, bits) cell a fresh float model is loaded, the calibration set built (the `harness quantize`
defaults: sqa, 64 samples, seed 0) and `qvlm_harness.quantize.quantize` run: it times one FP pass over the
calibration set and then the method, so `fp_passes` is measured under the same load as the method. One JSON line
per cell (seconds, FP pass seconds, FP passes, stages, 1-minute load average before and after) goes to stdout.
The script only uses the public quantize entry point, so the same file measures an older checkout too (run it
with that checkout first on PYTHONPATH, interleaved with this one, to compare under the same load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="gptq,zeroquant-v2,smoothquant,awq")
    p.add_argument("--bits", default="w4a16,w4a4")
    p.add_argument("--model", default="default")
    p.add_argument("--calib-task", default="sqa")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--label", default="", help="free text copied into every line (e.g. before/after)")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option, as `harness run --method-option` takes it (repeatable)")
    args = p.parse_args(argv)

    import qvlm_harness
    from qvlm_harness import plugins
    from qvlm_harness.checkpoint import load_float
    from qvlm_harness.config import QuantSpec
    from qvlm_harness.models.llava import set_threads
    from qvlm_harness.plan import resolve_model
    from qvlm_harness.quantize import calibration_for, quantize

    options: dict[str, dict[str, str]] = {}
    for item in args.method_option:
        name, _, value = item.partition("=")
        method_name, _, key = name.partition(".")
        if not (key and _):
            p.error(f"--method-option {item!r}: write METHOD.KEY=VALUE, e.g. qvlm.iters=8")
        options.setdefault(plugins.methods.resolve_name(method_name), {})[key] = value
    threads = set_threads(args.threads)
    task = plugins.tasks.get(plugins.tasks.resolve_name(args.calib_task))()
    model_id, path = resolve_model(args.model)
    for method_name in args.methods.split(","):
        for bits in args.bits.split(","):
            canonical = plugins.methods.resolve_name(method_name)
            method = plugins.methods.get(canonical)(**options.get(canonical, {}))
            spec = QuantSpec.parse(bits)
            calibration = calibration_for(method, spec, task, args.calib_samples, 0)
            adapter = load_float(path, name=model_id)
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            qm = quantize(adapter, method, spec, calibration)
            wall = time.perf_counter() - t0
            cost = qm.search_cost
            print(json.dumps({
                "label": args.label, "code": os.path.dirname(qvlm_harness.__file__), "method": method_name,
                "bits": bits, "options": options.get(canonical, {}), "threads": threads,
                "seconds": round(cost.seconds, 2),
                "fp_pass_s": round(cost.fp_pass_s or 0.0, 2), "fp_passes": round(cost.fp_passes or 0.0, 2),
                "stages": cost.stages, "wall_with_fp_pass": round(wall, 2),
                "load_before": load0, "load_after": os.getloadavg()[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
