"""`harness` command line. Built-in subcommands live in `harness/commands/<name>.py`; plugins add their own.

A subcommand is anything with `add_parser(subparsers)` and `execute(args) -> int`: a module in
`qvlm_harness.commands`, or an entry point of the group ``qvlm_harness.commands`` (the engine knows no method, so
Q-VLM's `analyze` comes in this way)::

    [project.entry-points."qvlm_harness.commands"]
    mycommand = "mypkg.commands.mycommand"

Built-ins win on a name clash. A plugin that fails to load does not break `harness`: its name stays in
`harness --help`, marked unavailable, and running it ends in one line naming the cause.

Every user error ends in one line on stderr naming the fix, and exit code 2; results already written stay.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Protocol

from qvlm_harness import __version__
from qvlm_harness.errors import HarnessError

# name -> module in harness.commands (imported when the parser is built; modules import heavy deps lazily)
SUBCOMMANDS = ["run", "validate", "ls", "models", "report", "quantize", "eval", "compare", "bench", "ablate", "export"]
COMMAND_GROUP = "qvlm_harness.commands"
COMMAND_ATTR = "_harness_command"  # set on the parsed namespace: the command object that runs it


class Command(Protocol):
    def add_parser(self, subparsers: argparse._SubParsersAction) -> None: ...

    def execute(self, args: argparse.Namespace) -> int: ...


@dataclass
class UnavailableCommand:
    """Stands in for a plugin command that failed to load, so one broken plugin costs one line, not every call."""

    name: str
    origin: str  # the entry point's target and the distribution that declares it
    reason: str  # one line: exception type and message

    def add_parser(self, subparsers: argparse._SubParsersAction) -> None:
        subparsers.add_parser(self.name, help=f"unavailable: {self.reason}", add_help=False)

    def execute(self, args: argparse.Namespace) -> int:
        raise HarnessError(f"plugin command '{self.name}' ({self.origin}) failed to load: {self.reason}; "
                           f"fix or uninstall the package that declares it")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_plugin(ep: EntryPoint, taken: set[str]) -> Command:
    """The entry point's command object, or an `UnavailableCommand` saying why it cannot be used."""
    dist = ep.dist.name if ep.dist is not None else "unknown distribution"
    origin = f"{ep.value} from {dist}"
    try:
        command = ep.load()
        missing = [f for f in ("add_parser", "execute") if not callable(getattr(command, f, None))]
        if missing:
            raise TypeError(f"{ep.value} has no {' or '.join(missing)}()")
        # a dry run on a scratch parser: a failing add_parser cannot leave half a subcommand in the real one
        scratch = argparse.ArgumentParser(prog="harness").add_subparsers()
        command.add_parser(scratch)
        names = set(scratch.choices)
        if ep.name not in names:
            raise TypeError(f"its add_parser() registers {', '.join(sorted(names)) or 'nothing'}, not '{ep.name}'")
        if names & taken:
            raise TypeError(f"it registers {', '.join(sorted(names & taken))}, already taken")
    except Exception as exc:  # a broken plugin must not take the whole CLI down
        return UnavailableCommand(ep.name, origin, _one_line(exc))
    return command


def commands() -> dict[str, Command]:
    """Every subcommand by name: the built-ins, then the entry-point plugins (sorted by name; built-ins win)."""
    table: dict[str, Command] = {
        name: importlib.import_module(f"qvlm_harness.commands.{name.replace('-', '_')}") for name in SUBCOMMANDS}
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        if ep.name not in table:  # built-ins win; the first declaration of a plugin name wins
            table[ep.name] = _load_plugin(ep, set(table))
    return table


def build_parser(table: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="harness", description="Benchmark post-training quantization of LVLMs.")
    ap.add_argument("--version", action="version", version=f"qvlm-harness {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in (commands() if table is None else table).values():
        before = set(sub.choices)
        command.add_parser(sub)
        for name in set(sub.choices) - before:  # its name and any aliases: parsing tells main what to run
            sub.choices[name].set_defaults(**{COMMAND_ATTR: command})
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        parser = build_parser()
        from qvlm_harness.commands.config_file import expand_config

        argv = expand_config(sys.argv[1:] if argv is None else argv, parser)
        args, extra = parser.parse_known_args(argv)
        command = getattr(args, COMMAND_ATTR)
        if extra and not isinstance(command, UnavailableCommand):  # as parse_args would; an unavailable
            parser.error(f"unrecognized arguments: {' '.join(extra)}")  # command explains itself instead
        return command.execute(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished cells are in the store and finished samples in the sample logs; "
              "rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
