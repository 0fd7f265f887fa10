"""`--config FILE.yaml`: a run's settings from a file (lm-eval's config objects from CLI or file; the regression
suite's YAML files). The file's keys are the command's flag names (`methods`, `bits`, `limit`, `method-option`
or `method_options`, ...); it is expanded into flags placed before the command line's own, so a flag given on
the command line wins (append flags such as `--method-option` add up, the command line's value winning per
option).

    methods: [fp32, gptq]
    tasks: sqa
    bits: [w4a16, w4a4]
    limit: 32
    method_options: {gptq: {act_order: true}}
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qvlm_harness.errors import HarnessError


def _flag_table(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    table = {}
    for action in sub._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                table[opt[2:]] = action
                table[opt[2:].replace("-", "_")] = action
        if action.dest and action.option_strings:
            table.setdefault(action.dest, action)
    if "method-option" in table:
        table["method_options"] = table["method-option"]  # the natural plural for a mapping
    table.pop("help", None)
    return table


def _tokens(key: str, value: Any, action: argparse.Action, source: Path) -> list[str]:
    flag = next(o for o in action.option_strings if o.startswith("--"))
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise HarnessError(f"{source}: {key} takes true or false, got {value!r}")
        return [flag] if value else []
    if flag == "--method-option":
        if isinstance(value, dict):  # {method: {option: value}}
            pairs = []
            for method, opts in value.items():
                if not isinstance(opts, dict):
                    raise HarnessError(f"{source}: method_options.{method} must map option names to values")
                pairs += [f"{method}.{k}={_scalar(v)}" for k, v in opts.items()]
        else:
            pairs = [str(v) for v in (value if isinstance(value, list) else [value])]
        return [t for p in pairs for t in (flag, p)]
    if isinstance(value, dict):
        raise HarnessError(f"{source}: {key} takes a value or a list, not a mapping")
    if isinstance(action, argparse._AppendAction):
        return [t for v in (value if isinstance(value, list) else [value]) for t in (flag, _scalar(v))]
    text = ",".join(_scalar(v) for v in value) if isinstance(value, list) else _scalar(value)
    return [flag, text]


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "none" if v is None else str(v)


def expand_config(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv` with every `--config FILE` replaced by the file's settings as flags, placed right after the
    subcommand (so the command line's own flags, which follow, win)."""
    argv = list(argv)
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    command = next((a for a in argv if not a.startswith("-")), None)
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if command not in choices or "config" not in _flag_table(choices[command]):
        raise HarnessError("--config goes after a command that takes it, e.g. harness run --config suite.yaml")
    sub = choices[command]
    table = _flag_table(sub)
    rest, inserted, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config="):
            path = Path(a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else ""))
            i += 1 if "=" in a else 2
            inserted += _file_tokens(path, table)
            continue
        rest.append(a)
        i += 1
    at = rest.index(command) + 1
    return rest[:at] + inserted + rest[at:]


def _file_tokens(path: Path, table: dict[str, argparse.Action]) -> list[str]:
    import yaml

    if not str(path) or not path.is_file():
        raise HarnessError(f"--config {path}: no such file; pass a YAML file of run settings")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise HarnessError(f"--config {path} is not valid YAML ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise HarnessError(f"--config {path} must hold a mapping of flag names to values")
    tokens: list[str] = []
    for key, value in data.items():
        action = table.get(str(key))
        if action is None or key == "config":
            known = sorted({k for k in table if "_" not in k and k != "config"})
            raise HarnessError(f"--config {path}: unknown setting {key!r}; known: {', '.join(known)}")
        tokens += _tokens(str(key), value, action, path)
    return tokens
