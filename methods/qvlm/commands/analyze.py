"""`harness analyze dependency`: does activation entropy predict cross-layer dependency on *your* model?

For consecutive layer pairs it measures the discretisation error difference (DED) between layer-wise and joint
rounding search (Q-VLM's dependency measure) and the entropy of the first layer's input activations, prints them
per layer with the R^2 of the linear fit, and writes the paper's scatter plot (one point per calibration sample
at one layer, and one point per layer) with the data as JSON and CSV.

A Q-VLM plugin subcommand (entry point ``analyze`` in the group ``qvlm_harness.commands``): it is built from
Q-VLM's own units, entropies and searches, so it lives with them and the engine CLI imports no method.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qvlm_harness.errors import HarnessError


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="Q-VLM analyses of a model (dependency: entropy vs cross-layer dependency)")
    p.add_argument("analysis", choices=["dependency"], help="dependency: per-layer entropy vs DED, R^2, scatter plot")
    p.add_argument("--model", default="default", help="'default', 'tiny', a Llava checkpoint folder or a hub id")
    p.add_argument("--task", default="sqa", help="calibration task (its train split), e.g. sqa")
    p.add_argument("--data-dir", type=Path, default=None, help="official data folder of the task")
    p.add_argument("--bits", default="w4a4", help="the quantization setting the searches use (default w4a4)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration samples (points per layer)")
    p.add_argument("--iters", type=int, default=8, help="search steps per unit (paper scale: thousands)")
    p.add_argument("--flip-rounds", type=int, default=24,
                   help="rounds of the joint search's greedy flip stage (0: block search only; DED is then often 0)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--stack", choices=["lm", "vision", "all"], default="lm", help="which layer stack(s) to analyse")
    p.add_argument("--layers", default=None, help="first-layer indices of the pairs, e.g. 10-20 or 3,7 (default all)")
    p.add_argument("--layer", type=int, default=None,
                   help="layer whose per-sample scatter is plotted (default: the middle analysed LM pair)")
    p.add_argument("--entropy", choices=["hist", "official"], default="hist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", type=Path, default=Path("results/analysis"))


def _indices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                out += list(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise HarnessError(f"--layers takes indices and ranges like 10-20 or 3,7; got {text!r}") from None
    return sorted(set(out))


def _print_pair(pair, seconds: float) -> None:
    print(f"  {pair.unit} -> {pair.successor}: entropy {pair.entropy:.3f}, layer-wise {pair.error_layerwise:.5f}, "
          f"joint {pair.error_joint:.5f}, DED {pair.ded:.5f} ({seconds:.0f} s)", file=sys.stderr, flush=True)


def execute(args: argparse.Namespace) -> int:
    import torch

    from qvlm_harness import plugins
    from qvlm_harness.calibration import CalibrationSet
    from qvlm_harness.config import QuantSpec
    from qvlm_harness.methods.qvlm.dependency import analyze_stack, pearson_r, r_squared
    from qvlm_harness.methods.qvlm.options import QVLMOptions
    from qvlm_harness.methods.qvlm.units import build_batches, capture_stack_inputs, find_units
    from qvlm_harness.models.llava import LlavaAdapter, set_threads
    from qvlm_harness.runner import check_model_source, resolve_model

    if args.calib_samples < 3:
        raise HarnessError("--calib-samples must be at least 3 (R^2 needs three points)")
    spec = QuantSpec.parse(args.bits)
    if spec.is_float:
        raise HarnessError("--bits must quantize something, e.g. w4a4")
    opts = QVLMOptions(iters=args.iters, batch_size=args.batch_size, entropy=args.entropy)
    task = plugins.tasks.get(args.task)()
    check_model_source(args.model)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    model_id, path = resolve_model(args.model)
    t0 = time.time()
    adapter = LlavaAdapter.load(path, name=model_id)
    adapter.model.requires_grad_(False)
    calibration = CalibrationSet.from_task(task, args.calib_samples, args.seed, args.data_dir)
    batches = build_batches(adapter, calibration, opts.batch_size)
    units = find_units(adapter.model)
    stacks = ["vision", "lm"] if args.stack == "all" else [args.stack]
    entries = capture_stack_inputs(adapter.model, batches, stacks, units)
    wanted = _indices(args.layers)
    results: dict[str, list] = {}
    for stack in stacks:
        used = [u for u in units[stack] if u.used]
        if len(used) < 2 or not entries.get(stack):
            print(f"{stack}: fewer than two layers reached by the calibration data; skipped", file=sys.stderr)
            continue
        print(f"analysing {stack}: {len(used) - 1 if wanted is None else len(wanted)} layer pairs on "
              f"{len(calibration)} samples ({spec.tag}, {opts.iters} steps per unit)", file=sys.stderr)
        results[stack] = analyze_stack(used, entries[stack], spec, opts, args.seed, wanted,
                                       flip_rounds=args.flip_rounds, progress=_print_pair)
    if not results:
        raise HarnessError("nothing to analyse: no layer pair was reached by the calibration data")

    summary: dict = {"model": model_id, "task": args.task, "bits": spec.tag, "samples": len(calibration),
                     "iters": opts.iters, "entropy": opts.entropy, "seconds": None, "stacks": {}}
    rows = []
    for stack, pairs in results.items():
        ents = [p.entropy for p in pairs]
        deds = [p.ded for p in pairs]
        summary["stacks"][stack] = {
            "r2_layers": r_squared(ents, deds), "r_layers": pearson_r(ents, deds),
            "pairs": [{"unit": p.unit, "successor": p.successor, "entropy": p.entropy, "ded": p.ded,
                       "error_layerwise": p.error_layerwise, "error_joint": p.error_joint,
                       "r2_samples": r_squared(p.sample_entropy, p.sample_ded),
                       "r_samples": pearson_r(p.sample_entropy, p.sample_ded),
                       "r_tokens_ded": pearson_r(p.sample_tokens, p.sample_ded),
                       "r_tokens_entropy": pearson_r(p.sample_tokens, p.sample_entropy),
                       "sample_entropy": p.sample_entropy, "sample_ded": p.sample_ded,
                       "sample_tokens": p.sample_tokens} for p in pairs],
        }
        for p in pairs:
            rows.append({"stack": stack, "layer": p.unit.rsplit(".", 1)[-1] if stack != "projector" else "projector",
                         "entropy": p.entropy, "ded": p.ded, "error_layerwise": p.error_layerwise,
                         "error_joint": p.error_joint, "r2_samples": r_squared(p.sample_entropy, p.sample_ded),
                         "r_samples": pearson_r(p.sample_entropy, p.sample_ded),
                         "r_tokens_ded": pearson_r(p.sample_tokens, p.sample_ded)})
    focus_stack = "lm" if "lm" in results else next(iter(results))
    pairs = results[focus_stack]
    layer = args.layer
    focus = next((p for p in pairs if p.unit.endswith(f".{layer}")), None) if layer is not None else None
    if focus is None:
        if layer is not None:
            raise HarnessError(f"--layer {layer} was not analysed; pick one of the analysed pairs (see --layers)")
        focus = pairs[len(pairs) // 2]
    summary["focus"] = {"stack": focus_stack, "unit": focus.unit,
                        "r2_samples": r_squared(focus.sample_entropy, focus.sample_ded),
                        "r_samples": pearson_r(focus.sample_entropy, focus.sample_ded),
                        "r_tokens_ded": pearson_r(focus.sample_tokens, focus.sample_ded),
                        "r_tokens_entropy": pearson_r(focus.sample_tokens, focus.sample_entropy)}
    summary["seconds"] = round(time.time() - t0, 1)

    out = args.output / model_id.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"dependency-{args.task}-{spec.tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1, default=_json) + "\n")
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_csv(out / f"{stem}.csv", index=False)
    png = out / f"{stem}.png"
    _plot(png, results, focus, summary, model_id, args.task, spec.tag)

    print(table.to_markdown(index=False, floatfmt=".4g"))
    for stack in results:
        st = summary["stacks"][stack]
        print(f"\n{stack}: R^2(entropy, DED) over layers = {st['r2_layers']:.4f} ({_direction(st['r_layers'])})")
    print(f"{focus.unit}: R^2 over samples = {summary['focus']['r2_samples']:.4f} "
          f"({_direction(summary['focus']['r_samples'])}; paper: 0.9718 at LLaVA-13B layer 15 on ScienceQA, "
          f"DED rising with entropy)")
    fo = summary["focus"]
    print(f"control: r(tokens, DED) = {fo['r_tokens_ded']:+.3f}, r(tokens, entropy) = {fo['r_tokens_entropy']:+.3f} "
          f"(when both are near +-1, sequence length explains the entropy/DED relation)")
    print(f"\nwrote {png}, {out / (stem + '.json')}, {out / (stem + '.csv')}; {summary['seconds']:.0f}s")
    return 0


def _direction(r: float) -> str:
    if r != r:
        return "r undefined"
    return f"r = {r:+.3f}: DED {'rises' if r > 0 else 'falls'} as entropy rises"


def _json(x):
    return None if x != x else float(x)  # NaN -> null


def _plot(path: Path, results: dict, focus, summary: dict, model: str, task: str, bits: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    ax.scatter(focus.sample_entropy, focus.sample_ded, s=14)
    _fit_line(ax, focus.sample_entropy, focus.sample_ded)
    ax.set_title(f"{focus.unit.split('model.', 1)[-1]}: R$^2$ = {summary['focus']['r2_samples']:.3f}", fontsize=9)
    ax.set_xlabel("entropy of the layer's input activations (per sample)")
    ax.set_ylabel("DED (layer-wise - joint error)")
    ax = axes[1]
    for stack, pairs in results.items():
        ax.scatter([p.entropy for p in pairs], [p.ded for p in pairs], s=14,
                   label=f"{stack} (R$^2$ = {summary['stacks'][stack]['r2_layers']:.3f})")
        _fit_line(ax, [p.entropy for p in pairs], [p.ded for p in pairs])
    ax.set_xlabel("entropy of the layer's input activations")
    ax.set_ylabel("DED")
    ax.set_title("one point per layer", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(f"{model} on {task}, {bits}: entropy vs cross-layer dependency", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fit_line(ax, x, y) -> None:
    if len(x) < 2 or max(x) == min(x):
        return
    import numpy as np

    a, b = np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)
    xs = np.linspace(min(x), max(x), 2)
    ax.plot(xs, a * xs + b, color="gray", linewidth=1)
