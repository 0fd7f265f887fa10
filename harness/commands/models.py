"""`harness models build-default|path`: build the embedded default checkpoint into the cache, or print its path."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="build the embedded default model (cached) or print its path")
    p.add_argument("action", choices=["build-default", "path"])
    p.add_argument("--rebuild", action="store_true")


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness.models.default import default_model_path

    print(default_model_path(rebuild=args.rebuild and args.action == "build-default"))
    return 0
