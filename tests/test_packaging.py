"""The install layout: one namespaced root, every package folder of the repository listed in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_installed_under_qvlm_harness():
    cfg = _config()
    package_dir = cfg["package-dir"]
    listed = set(cfg["packages"])
    for name, folder in package_dir.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            dotted = ".".join((name, *rel.parts)) if rel.parts else name
            if any(p.startswith(f"{name}.") and dotted.startswith(p + ".") for p in package_dir if p != name):
                continue  # a folder mapped on its own (e.g. methods/ under qvlm_harness.methods)
            assert dotted in listed, f"{init.parent} is not installed: add {dotted!r} to [tool.setuptools] packages"
    assert all(p == "qvlm_harness" or p.startswith("qvlm_harness.") for p in listed)



def test_command_entry_points_are_installed_and_keep_the_contract():
    """pyproject's `qvlm_harness.commands` entry points are what the installed metadata exposes (a stale editable
    install hides a command: re-run `pip install --no-deps -e .`), and each target has add_parser and execute."""
    import importlib
    from importlib.metadata import entry_points

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["qvlm_harness.commands"]
    installed = {ep.name: ep.value for ep in entry_points(group="qvlm_harness.commands")
                 if ep.dist is not None and ep.dist.name == "qvlm-harness"}
    assert installed == declared, "the installed entry points are stale: run `pip install --no-deps -e .`"
    for target in declared.values():
        command = importlib.import_module(target)
        assert callable(command.add_parser) and callable(command.execute), target
