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


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            ids.add(id(first.value))
    return ids


def test_engine_code_names_no_method_or_task_outside_the_registry():
    """String literals naming a registered method or task (or an alias) appear only in `harness/plugins.py`, the
    registry's built-in entries. fp32/fp16/bf16 double as dtype names (`--dtype fp32`) and are allowed as such."""
    from qvlm_harness import plugins

    names = set()
    for registry in (plugins.methods, plugins.tasks):
        for n in registry.names():
            names |= {n, *registry.aliases_of(n)}
    names -= {"fp32", "fp16", "bf16"}
    offenders = []
    for path in sorted(ENGINE.rglob("*.py")):
        if path.name == "plugins.py":
            continue
        tree = ast.parse(path.read_text())
        docs = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                words = {w.strip(" .,;:()'\"=") for w in node.value.replace(",", " ").split()}
                hits = sorted(words & names)
                if hits:
                    offenders.append(f"{path.relative_to(ENGINE.parent)}:{node.lineno}: {hits}")
    assert offenders == [], "engine code names plugins:\n" + "\n".join(offenders)
