"""`harness ls methods|tasks|models`: what is registered (built-ins and entry-point plugins)."""

from __future__ import annotations

import argparse

from qvlm_harness import plugins


def add_parser(sub) -> None:
    p = sub.add_parser("ls", help="list registered methods, tasks or models")
    p.add_argument("what", choices=["methods", "tasks", "models"])
    p.add_argument("--options", action="store_true", help="methods: each method's options (type, default, help)")


def execute(args: argparse.Namespace) -> int:
    registry = {"methods": plugins.methods, "tasks": plugins.tasks, "models": plugins.models}[args.what]
    for name in registry.names():
        aliases = registry.aliases_of(name)
        line = f"{name:<14} {registry.summary(name)}"
        if aliases:
            line += f" (aliases: {', '.join(aliases)})"
        if args.what == "methods" and args.options:
            line += "\n" + method_options_text(registry.get(name))
        if args.what == "tasks":
            task = registry.get(name)
            line += f"\n{'':<14} metrics: {', '.join(task.metrics)}; eval split: {task.eval_split}"
            line += f"\n{'':<14} data: {task.data_layout}"
        print(line)
    for prefix, summary in registry.prefixes().items():
        print(f"{prefix + ':<name>':<14} {summary}")
    return 0


def method_options_text(method_cls) -> str:
    """The options of one method class, one per line: name, type, default, help (and the allowed values)."""
    infos = method_cls.Config.describe_options()
    if not infos:
        return f"{'':<14} (no options)"
    lines = []
    for o in infos:
        default = ",".join(o.default) if isinstance(o.default, tuple) else o.default
        lines.append(f"{'':<14} {method_cls.name}.{o.name}={default}  ({o.type}) {o.help}")
    return "\n".join(lines)
