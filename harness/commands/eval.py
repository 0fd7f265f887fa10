"""`harness eval --model DIR`: evaluate a quantized checkpoint as stored (no re-quantization); rows land in the
store like `run`'s, labelled with the manifest's method and bits."""

from __future__ import annotations

import argparse

from qvlm_harness.commands.common import add_run_arguments, run_spec_from_args
from qvlm_harness.errors import HarnessError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a quantized checkpoint folder written by `harness quantize`")
    add_run_arguments(p, methods_required=False)


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness.checkpoint import read_manifest
    from qvlm_harness.commands.run import execute_spec

    if read_manifest(args.model) is None:
        raise HarnessError(f"--model {args.model} is not a quantized checkpoint (no manifest.json); create one with "
                           "`harness quantize --output DIR`, or evaluate float models with `harness run`")
    if args.methods:
        raise HarnessError("harness eval takes the method from the checkpoint's manifest; drop --methods")
    args.methods = ""
    spec = run_spec_from_args(args)
    return execute_spec(spec, args)
