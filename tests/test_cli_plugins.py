"""Plugin subcommands: entry points of the group `qvlm_harness.commands` join `harness`; built-ins win on a clash;
a broken plugin is listed as unavailable and costs one line, never a traceback on every call."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint

import pytest

from qvlm_harness import cli
from qvlm_harness.cli import COMMAND_GROUP, main

HELLO = '''
    def add_parser(sub):
        p = sub.add_parser("hello", help="greets from a plugin")
        p.add_argument("--name", required=True)

    def execute(args):
        print(f"hello {args.name}")
        return 7
'''


def install_plugins(monkeypatch, tmp_path, modules: dict[str, str], points: dict[str, str]) -> None:
    """Write `modules` (name -> source) on sys.path and add `points` (command -> target) to the real entry points."""
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    real = cli.entry_points
    extra = [EntryPoint(name, value, COMMAND_GROUP) for name, value in points.items()]
    monkeypatch.setattr(cli, "entry_points", lambda group: [*real(group=group), *extra])


def top_help(capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_plugin_command_is_listed_in_help_and_runs(monkeypatch, tmp_path, capsys):
    install_plugins(monkeypatch, tmp_path, {"plugin_hello": HELLO}, {"hello": "plugin_hello"})
    listed = top_help(capsys)
    assert "hello" in listed and "greets from a plugin" in listed
    assert main(["hello", "--name", "world"]) == 7  # the plugin's own exit code
    assert capsys.readouterr().out == "hello world\n"
    with pytest.raises(SystemExit) as done:
        main(["hello", "--name", "x", "--bogus"])  # unknown arguments still fail as argparse does
    assert done.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_qvlm_analyze_comes_from_the_installed_entry_point(capsys):
    """The engine CLI lists no method command itself: `analyze` is Q-VLM's, declared in pyproject.toml."""
    assert "analyze" not in cli.SUBCOMMANDS
    ep = {e.name: e for e in cli.entry_points(group=COMMAND_GROUP)}.get("analyze")
    assert ep is not None, "the analyze entry point is not installed: run `pip install --no-deps -e .`"
    assert ep.value == "qvlm_harness.methods.qvlm.commands.analyze"
    assert "analyze" in top_help(capsys)


def test_broken_plugin_is_reported_in_one_line(monkeypatch, tmp_path, capsys):
    install_plugins(monkeypatch, tmp_path,
                    {"plugin_broken": "import qvlm_no_such_package_xyz\n"}, {"broken": "plugin_broken"})
    listed = top_help(capsys)
    assert "broken" in listed and "unavailable: ModuleNotFoundError" in listed
    assert main(["broken", "--any", "args"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: plugin command 'broken' (plugin_broken from ")
    assert "No module named 'qvlm_no_such_package_xyz'" in err and "uninstall" in err
    assert main(["ls", "methods"]) == 0  # every other command is unaffected, and silent about it
    captured = capsys.readouterr()
    assert captured.err == "" and "rtn" in captured.out


RUNS = "def execute(args):\n    return 0\n"


@pytest.mark.parametrize("module, source, reason", [
    ("plugin_no_execute", "def add_parser(sub):\n    sub.add_parser('shaky')\n", "has no execute()"),
    ("plugin_add_parser_raises", "def add_parser(sub):\n    raise RuntimeError('bad\\nparser')\n" + RUNS,
     "RuntimeError: bad parser"),
    ("plugin_wrong_name", "def add_parser(sub):\n    sub.add_parser('other')\n" + RUNS, "registers other, not 'shaky'"),
    ("plugin_alias_clash", "def add_parser(sub):\n    sub.add_parser('shaky', aliases=['ls'])\n" + RUNS,
     "registers ls, already taken"),
])
def test_plugin_that_breaks_the_contract_is_unavailable(monkeypatch, tmp_path, capsys, module, source, reason):
    install_plugins(monkeypatch, tmp_path, {module: source}, {"shaky": module})
    command = cli.commands()["shaky"]
    assert isinstance(command, cli.UnavailableCommand) and reason in command.reason
    assert main(["shaky"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err
    assert main(["ls", "tasks"]) == 0  # the built-in `ls` kept its parser


def test_builtins_win_on_a_name_clash(monkeypatch, tmp_path, capsys):
    """A plugin named like a built-in is never even imported (its import would fail)."""
    install_plugins(monkeypatch, tmp_path, {"plugin_ls": "raise SystemExit('imported')\n"}, {"ls": "plugin_ls"})
    assert cli.commands()["ls"].__name__ == "qvlm_harness.commands.ls"
    assert main(["ls", "models"]) == 0
    assert "tiny" in capsys.readouterr().out
