"""`harness` command line. Each subcommand lives in `harness/commands/<name>.py`.

Every user error ends in one line on stderr naming the fix, and exit code 2; results already written stay.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from qvlm_harness import __version__
from qvlm_harness.errors import HarnessError

# name -> module in harness.commands (imported when the parser is built; modules import heavy deps lazily)
SUBCOMMANDS = ["run", "validate", "ls", "models", "report", "quantize", "eval", "compare", "bench", "analyze", "ablate"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="harness", description="Benchmark post-training quantization of LVLMs.")
    ap.add_argument("--version", action="version", version=f"qvlm-harness {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"qvlm_harness.commands.{name.replace('-', '_')}").add_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
        module = importlib.import_module(f"qvlm_harness.commands.{args.command.replace('-', '_')}")
        return module.execute(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished cells are in the store and finished samples in the sample logs; "
              "rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
