"""`harness ls methods|tasks|models`: what is registered (built-ins and entry-point plugins)."""

from __future__ import annotations

import argparse

from qvlm_harness import plugins


def add_parser(sub) -> None:
    p = sub.add_parser("ls", help="list registered methods, tasks or models")
    p.add_argument("what", choices=["methods", "tasks", "models"])


def execute(args: argparse.Namespace) -> int:
    registry = {"methods": plugins.methods, "tasks": plugins.tasks, "models": plugins.models}[args.what]
    for name in registry.names():
        aliases = registry.aliases_of(name)
        line = f"{name:<14} {registry.summary(name)}"
        if aliases:
            line += f" (aliases: {', '.join(aliases)})"
        if args.what == "tasks":
            task = registry.get(name)
            line += f"\n{'':<14} metrics: {', '.join(task.metrics)}; eval split: {task.eval_split}"
            line += f"\n{'':<14} data: {task.data_layout}"
        print(line)
    for prefix, summary in registry.prefixes().items():
        print(f"{prefix + ':<name>':<14} {summary}")
    return 0
