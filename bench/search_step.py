"""Seconds per search step of Q-VLM's block search and aespa's learned rounding, as multiples of one FP pass over
the same calibration set measured in the same process (so the figures mean the same on a loaded machine).

Variants (each timed over the same steps, interleaved in rounds, median of the rounds):

* qvlm: ``reference`` (autograd soft weight + regulariser graph, float32, unfused Adam, the formulation before the
  speed-up), ``fused`` (one-pass soft rounding, fused Adam, float32), ``fused-bf16`` (+ bfloat16 matrix products
  under autocast), ``fused-bf16-compiled`` (+ the compiled soft-rounding kernel);
* aespa, on real layers of the default model with their input Hessians from the calibration set:
  ``reference`` (`learn_rounding_reference`: the eager loop with torch.optim.Adam), ``fused`` (one step function
  with Adam written in, float32), ``fused-bf16`` (+ bfloat16 ``E @ H``), ``fused-bf16-compiled``.

With ``--quality`` it also runs each qvlm variant's full block search on the timed blocks (``--quality-iters`` steps
per unit) and aespa's rounding of the timed layers (float32 eager vs bfloat16 compiled, ``--aespa-quality-iters``),
and prints the final hard-rounding objective of each (float32).

    python bench/search_step.py --methods qvlm,aespa --steps 8 --threads 1
    python bench/search_step.py --methods qvlm --quality --quality-iters 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.config import QuantSpec
from qvlm_harness.methods.qvlm.options import QVLMOptions
from qvlm_harness.methods.qvlm.search import BlockSearch, restore_units
from qvlm_harness.methods.qvlm.units import (
    build_batches,
    capture_stack_inputs,
    find_units,
    set_submodule,
    unit_outputs,
)
from qvlm_harness.models.default import default_model_path
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.quantize import time_fp_pass
from qvlm_harness.tasks.sqa import ScienceQA

QVLM_VARIANTS = {  # name -> (fused, search_dtype, compile)
    "reference": (False, "fp32", "off"),
    "fused": (True, "fp32", "off"),
    "fused-bf16": (True, "bf16", "off"),
    "fused-bf16-compiled": (True, "bf16", "on"),
}


def _targets(units, inputs):
    return {si.batch: unit_outputs(units, si.hidden, si) for si in inputs}


def qvlm_steps(adapter, calibration, spec, steps, rounds, quality_iters, quality, picks):
    batches = build_batches(adapter, calibration, 2)
    units = find_units(adapter.model)
    entries = capture_stack_inputs(adapter.model, batches, ["vision", "lm"], units)
    times = {}
    for stack, idx in picks:
        block = [units[stack][idx]]
        inputs = entries[stack]
        targets = _targets(block, inputs)
        searches = {}
        for name, (fused, dtype, comp) in QVLM_VARIANTS.items():
            opts = QVLMOptions(iters=0, search_dtype=dtype, compile=comp)
            s = BlockSearch(block, [1.0], spec, opts, seed=0, fused=fused)
            s.run(inputs, targets)  # wraps, initialises; 0 steps
            searches[name] = s
            restore_units(block, s.wrapped)
        per = {name: [] for name in searches}
        for r in range(rounds + 1):  # round 0 warms up (and compiles)
            for name, s in searches.items():
                for u in block:  # install this variant's wrapped linears
                    for fqn, m in s.wrapped.items():
                        if fqn.startswith(u.name + "."):
                            set_submodule(u.module, fqn[len(u.name) + 1:], m)
                v = [m.rounding.v for m in s.wrapped.values() if m.rounding is not None]
                t0 = time.perf_counter()
                s._optimise(inputs, targets, steps, v, [])
                if r:
                    per[name].append((time.perf_counter() - t0) / steps)
                restore_units(block, s.wrapped)
        for name, ts in per.items():
            times[(stack, idx, name)] = statistics.median(ts)
        if quality:
            for name in ("fused", "fused-bf16-compiled"):
                fused, dtype, comp = QVLM_VARIANTS[name]
                opts = QVLMOptions(iters=quality_iters, search_dtype=dtype, compile=comp)
                s = BlockSearch(block, [1.0], spec, opts, seed=0, fused=fused)
                res = s.run(inputs, targets)
                print(f"quality qvlm {stack}[{idx}] {name}: loss before {res.loss_before:.5f} after "
                      f"{res.loss_after:.5f} kept_init={res.kept_init} ({res.seconds:.0f} s)", flush=True)
                restore_units(block, s.wrapped)
    return times


def _aespa_variants(W, obj, qp, fused, reference):
    return {
        "reference": lambda n: reference(W, W, obj, qp, iters=n),
        "fused": lambda n: fused(W, W, obj, qp, iters=n, dtype="fp32", compiled=False),
        "fused-bf16": lambda n: fused(W, W, obj, qp, iters=n, dtype="bf16", compiled=False),
        "fused-bf16-compiled": lambda n: fused(W, W, obj, qp, iters=n, dtype="bf16", compiled=True),
    }


AESPA_LAYERS = ("model.vision_tower.encoder.layer.5.attention.q_proj", "model.vision_tower.encoder.layer.5.mlp.fc1",
                "model.vision_tower.encoder.layer.5.mlp.fc2", "model.language_model.layers.15.self_attn.q_proj",
                "model.language_model.layers.15.mlp.gate_proj", "model.language_model.layers.15.mlp.down_proj")


def layer_hessians(adapter, calibration, names):
    """``2/n X^T X`` of each named linear's inputs over the calibration set (real tokens of the LM only)."""
    from qvlm_harness.quant.gptq import HessianAccumulator

    mods = dict(adapter.model.named_modules())
    accs = {n: HessianAccumulator(mods[n].in_features) for n in names}
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: accs[n].add(a[0].detach().reshape(-1,
                                                                                                  a[0].shape[-1])))
               for n in names]
    try:
        calibration.run(adapter, batch_size=8)
    finally:
        for h in handles:
            h.remove()
    return {n: (mods[n].weight.detach().float(), accs[n].value()) for n in names}


def aespa_steps(adapter, calibration, bits, steps, rounds, quality_iters, quality):
    from qvlm_harness.methods.aespa.adaround import (
        Objective,
        clip_search,
        learn_rounding,
        learn_rounding_reference,
    )

    times = {}
    for name, (W, H) in layer_hessians(adapter, calibration, AESPA_LAYERS).items():
        obj = Objective(H).damped(0.01)
        qp = clip_search(W, obj, bits, True, None, steps=25)
        label = f"{name.split('.')[-1]} {W.shape[0]}x{W.shape[1]}"
        variants = _aespa_variants(W, obj, qp, learn_rounding, learn_rounding_reference)
        per = {k: [] for k in variants}
        for r in range(rounds + 1):
            for vname, fn in variants.items():
                t0 = time.perf_counter()
                fn(steps)
                if r:
                    per[vname].append((time.perf_counter() - t0) / steps)
        for vname, ts in per.items():
            times[(label, vname)] = statistics.median(ts)
        if quality:
            for vname in ("fused", "fused-bf16-compiled"):
                res = variants[vname](quality_iters)
                print(f"quality aespa {name} W{bits} {vname}: objective nearest {res.loss_init:.6g} learned "
                      f"{res.loss:.6g} ({res.loss / res.loss_init:.4f})", flush=True)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="qvlm,aespa")
    ap.add_argument("--bits", default="w4a4", help="qvlm spec (aespa's layers use 3-bit weights)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--quality-iters", type=int, default=200, help="qvlm steps per unit of the quality runs")
    ap.add_argument("--aespa-quality-iters", type=int, default=2000, help="aespa iterations of the quality runs")
    ap.add_argument("--aespa-bits", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    adapter = LlavaAdapter.load(default_model_path())
    adapter.model.eval()
    adapter.model.requires_grad_(False)
    calibration = CalibrationSet.from_task(ScienceQA(), args.calib_samples, seed=0)
    fp = time_fp_pass(adapter, calibration)
    print(f"threads {args.threads}; one FP pass over {args.calib_samples} calibration samples: {fp:.1f} s", flush=True)
    rows = []
    if "qvlm" in methods:
        t = qvlm_steps(adapter, calibration, QuantSpec.parse(args.bits), args.steps, args.rounds, args.quality_iters,
                       args.quality, [("vision", 5), ("lm", 15)])
        rows += [(f"qvlm {s}[{i}]", n, v) for (s, i, n), v in t.items()]
    if "aespa" in methods:
        t = aespa_steps(adapter, calibration, args.aespa_bits, args.steps * 5, args.rounds, args.aespa_quality_iters,
                        args.quality)
        rows += [(f"aespa {shape}", n, v) for (shape, n), v in t.items()]
    fp2 = time_fp_pass(adapter, calibration)
    print(f"FP pass again: {fp2:.1f} s (load drift)")
    ref = (fp + fp2) / 2
    print(f"{'what':<22} {'variant':<22} {'s/step':>9} {'FP passes/step':>15} {'x reference':>12}")
    base = {w: v for w, n, v in rows if n == "reference"}
    for what, name, v in rows:
        print(f"{what:<22} {name:<22} {v:>9.4f} {v / ref:>15.5f} {base[what] / v:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
