"""Make the plain `lm-eval --model qvlm-harness ...` command find the harness's model (lm-eval 0.4.13 has no
entry-point discovery for models, so something must register it inside lm-eval's own process).

`install_hook()` writes one `.pth` file into site-packages. Python runs its single line at every start-up; that line
imports this stdlib-only module and calls `install()`, which adds a meta-path finder costing nothing until a process
imports `lm_eval.api.registry`. Right after that module has executed, the finder calls `qvlm_harness.lmeval.register()`
(built-ins first, then `qvlm-harness` as a lazy entry) and removes itself. Processes that never touch lm-eval pay
one tiny import. `uninstall_hook()` deletes the file. Nothing is installed implicitly: the user runs
`python -m qvlm_harness.lmeval_cli install-hook` once per environment.
"""

from __future__ import annotations

import os
import sys

PTH_NAME = "qvlm_harness_lmeval.pth"
TRIGGER = "lm_eval.api.registry"
PTH_LINE = ('import sys; exec("try:\\n    from qvlm_harness.lmeval.hook import install\\n    install()\\n'
            'except ImportError:\\n    pass")\n')


class _Loader:
    """Delegates to the real loader, then registers the model once the registry module exists. (Plain classes, not
    importlib.abc ones: this module is imported at every interpreter start-up and must stay cheap.)"""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        try:
            from qvlm_harness.lmeval import register

            register()
        except Exception as exc:  # never break lm-eval itself; say why the model is missing
            print(f"qvlm-harness: could not register the lm-eval model ({type(exc).__name__}: {exc})",
                  file=sys.stderr)


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        uninstall_finder()
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Arm the finder (idempotent). If lm-eval's registry is already imported, register right away."""
    if TRIGGER in sys.modules:
        from qvlm_harness.lmeval import register

        register()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def uninstall_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


def site_dir() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def install_hook(target: str | os.PathLike | None = None) -> str:
    """Write the .pth file into `target` (default: this environment's site-packages); returns its path.
    (Only `os`/`sys` here: this module is imported at every start-up once the hook is installed.)"""
    path = os.path.join(os.fspath(target or site_dir()), PTH_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(PTH_LINE)
    return path


def uninstall_hook(target: str | os.PathLike | None = None) -> str | None:
    path = os.path.join(os.fspath(target or site_dir()), PTH_NAME)
    if os.path.exists(path):
        os.remove(path)
        return path
    return None
