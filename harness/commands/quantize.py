"""`harness quantize`: quantize a model once and save a self-contained quantized checkpoint folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qvlm_harness import plugins
from qvlm_harness.commands.common import (
    GROUP_RULE,
    add_embeddings_argument,
    add_rotate_argument,
    method_options,
    scope_list,
)
from qvlm_harness.config import ALL_SCOPES, BITS_SYNTAX, QuantSpec
from qvlm_harness.errors import HarnessError


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with one method and save the checkpoint")
    p.add_argument("--method", required=True, help="the method (see `harness ls methods`)")
    p.add_argument("--bits", required=True, help=f"one setting, e.g. w4a16 or w8a8: {BITS_SYNTAX}; {GROUP_RULE}")
    p.add_argument("--model", default="default", help="'default', 'tiny', a Llava checkpoint folder or a hub id")
    p.add_argument("--calib-task", default=plugins.DEFAULT_CALIB_TASK,
                   help=f"task whose train split calibrates (default {plugins.DEFAULT_CALIB_TASK})")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--quantize", type=scope_list, default=ALL_SCOPES, dest="scope",
                   help="parts to quantize: vision,projector,lm (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the model is loaded and searched")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE")
    add_embeddings_argument(p)
    add_rotate_argument(p, "rotate the float model first (QuaRot); the checkpoint keeps the rotation and its online "
                        "Hadamards")
    p.add_argument("--output", type=Path, required=True, help="folder to write the quantized checkpoint to")


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness import plugins
    from qvlm_harness.checkpoint import is_checkpoint, load_float, read_manifest, save_quantized
    from qvlm_harness.images import check_images
    from qvlm_harness.models.llava import set_threads
    from qvlm_harness.plan import (
        check_device,
        check_group,
        check_model_source,
        linear_widths,
        local_model_config,
        meta_skeleton,
        resolve_model,
    )
    from qvlm_harness.quantize import calibration_for, quantize
    from qvlm_harness.writable import check_output_folder

    # everything below up to the model load is cheap; the load, calibration and search are not
    method_name = plugins.methods.resolve_name(args.method)
    options = method_options(args.method_option).get(method_name, {})
    method = plugins.methods.get(method_name)(**options)
    spec = method.canonical_spec(QuantSpec.parse(args.bits))
    if method.fixed_precision:
        raise HarnessError(f"{method_name} is an unquantized baseline; nothing to save (evaluate it with harness run)")
    reason = method.supports(spec)
    if reason is not None:
        raise HarnessError(f"method {method_name} does not support {spec.tag} ({reason})")
    method.check(spec)
    if args.calib_samples < 0:
        raise HarnessError("--calib-samples must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise HarnessError(f"--threads must be at least 1 (omit it for all cores), got {args.threads}")
    check_device(args.device)
    check_output_folder(args.output, "--output")
    if args.output.exists() and any(args.output.iterdir()) and not is_checkpoint(args.output):
        raise HarnessError(f"{args.output} exists and is not a quantized checkpoint; choose an empty folder")
    check_model_source(args.model)
    if read_manifest(args.model) is not None:
        raise HarnessError(f"{args.model} is already a quantized checkpoint; quantize the float model instead")
    model_id, path = resolve_model(args.model)
    config = local_model_config(path)
    if args.rotate != "none" and config is not None:
        from qvlm_harness.models.architectures import describe_model
        from qvlm_harness.models.rotation import rotation_problem

        reason = rotation_problem(describe_model(meta_skeleton(config, path), ("projector", "lm")), args.rotate)
        if reason is not None:
            raise HarnessError(f"--rotate {args.rotate} cannot rotate this model: {reason}")
    note = check_group(method, spec, lambda: {} if config is None else
                       linear_widths(meta_skeleton(config, path), args.scope))
    if note:
        print(f"note: {note}", file=sys.stderr)
    task = plugins.tasks.get(plugins.tasks.resolve_name(args.calib_task))()
    calibration = calibration_for(method, spec, task, args.calib_samples, args.seed, args.data_dir)
    if calibration is not None:
        check_images((f"calibration sample {r.sample_id} of {task.name}", r.image) for r in calibration.requests)
    set_threads(args.threads)
    adapter = load_float(path, name=model_id, device=args.device)
    fingerprint = adapter.fingerprint()
    qm = quantize(adapter, method, spec, calibration, scope=tuple(args.scope), seed=args.seed,
                  embeddings=args.embeddings, rotate=args.rotate)
    calib = None if calibration is None else {"task": task.name, "samples": len(calibration), "seed": args.seed}
    describe = method.describe(spec)
    if args.rotate != "none":
        from qvlm_harness.models.rotation import describe_rotation

        describe = f"{describe_rotation(args.rotate)} {describe}"
    save_quantized(qm, args.output, describe=describe, base_model=model_id, fingerprint=fingerprint,
                   scope=args.scope, calibration=calib)
    passes = qm.search_cost.fp_passes
    print(f"{method_name} {spec.tag}: {len(qm.quantized_modules)} layers quantized ({qm.execution}) in "
          f"{qm.search_cost.seconds:.1f}s" + (f" ({passes:.1f} FP passes)" if passes else "")
          + f", peak RSS {qm.search_cost.peak_rss_mb:.0f} MB", file=sys.stderr)
    print(f"saved {args.output}/ (evaluate with: harness eval --model {args.output} --tasks {task.name})")
    return 0
