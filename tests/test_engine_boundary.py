"""The engine (`harness/`) imports no method or task package: methods and tasks reach it only through the
registries' lazy "module:attr" strings and entry points, so a plugin can be moved, replaced or broken without
touching the engine. Parsed with `ast`, so comments and docstrings that mention a plugin do not count."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "harness"
PLUGIN_PACKAGES = ("qvlm_harness.methods", "qvlm_harness.tasks")


def plugin_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if any(n == p or n.startswith(p + ".") for p in PLUGIN_PACKAGES)]
    return found


def test_the_scanner_sees_every_import_form():
    src = ("import qvlm_harness.methods.qvlm\nfrom qvlm_harness.tasks import sqa\nfrom qvlm_harness import methods\n"
           "def f():\n    from qvlm_harness.methods.qvlm.units import find_units\n"
           "from qvlm_harness import plugins\nimport qvlm_harness.methodkit\nx = 'qvlm_harness.methods.rtn:RTN'\n")
    assert plugin_imports(src) == ["qvlm_harness.methods.qvlm", "qvlm_harness.tasks", "qvlm_harness.tasks.sqa",
                                   "qvlm_harness.methods", "qvlm_harness.methods.qvlm.units",
                                   "qvlm_harness.methods.qvlm.units.find_units"]


def test_engine_imports_no_method_or_task():
    offenders = {str(p.relative_to(ENGINE.parent)): imports for p in sorted(ENGINE.rglob("*.py"))
                 if (imports := plugin_imports(p.read_text()))}
    assert offenders == {}, f"the engine imports plugins (move the code into its plugin): {offenders}"
