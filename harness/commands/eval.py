"""`harness eval --model DIR`: evaluate a quantized checkpoint as stored (no re-quantization); rows land in the
store like `run`'s, labelled with the manifest's method and bits.

The checkpoint fixes how the model is quantized, so the flags that choose it (--bits, --quantize,
--calib-samples, --calib-task, --method-option, --dtype, --quantize-embeddings) are refused rather than silently
ignored. With ``--execution packed`` the checkpoint loads straight into packed modules (`load_quantized`)."""

from __future__ import annotations

import argparse

from qvlm_harness.commands.common import add_run_arguments, run_spec_from_args
from qvlm_harness.config import ALL_SCOPES
from qvlm_harness.errors import HarnessError

# flag -> (argparse dest, the value `run_spec_from_args` needs when the flag is not given)
FIXED_BY_CHECKPOINT = {"--bits": ("bits", "w8a8,w4a4"), "--quantize": ("scope", ALL_SCOPES),
                       "--calib-samples": ("calib_samples", 64), "--calib-task": ("calib_task", None),
                       "--method-option": ("method_option", []), "--dtype": ("dtype", "fp32"),
                       "--quantize-embeddings": ("embeddings", "none")}


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a quantized checkpoint folder written by `harness quantize`")
    add_run_arguments(p, methods_required=False)
    p.set_defaults(**{dest: None for dest, _ in FIXED_BY_CHECKPOINT.values()})  # None: not given


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness.checkpoint import read_manifest
    from qvlm_harness.commands.run import execute_spec

    if read_manifest(args.model) is None:
        raise HarnessError(f"--model {args.model} is not a quantized checkpoint (no manifest.json); create one with "
                           "`harness quantize --output DIR`, or evaluate float models with `harness run`")
    if args.methods:
        raise HarnessError("harness eval takes the method from the checkpoint's manifest; drop --methods")
    given = [flag for flag, (dest, _) in FIXED_BY_CHECKPOINT.items() if getattr(args, dest, None) is not None]
    if given:
        raise HarnessError(f"harness eval: the checkpoint {args.model} fixes how it is quantized; drop "
                           f"{', '.join(given)} (quantize again with `harness quantize` to change it)")
    for dest, default in FIXED_BY_CHECKPOINT.values():
        setattr(args, dest, default)
    args.methods = ""
    spec = run_spec_from_args(args)
    return execute_spec(spec, args)
