"""`python -m qvlm_harness.lmeval_cli ...`: lm-eval's own command line with the `qvlm-harness` model registered.

    python -m qvlm_harness.lmeval_cli run --model qvlm-harness \\
        --model_args model=default,method=rtn,bits=w4a4 --tasks mmmu_val_art --apply_chat_template
    python -m qvlm_harness.lmeval_cli --model qvlm-harness ...      # lm-eval's legacy spelling works too
    python -m qvlm_harness.lmeval_cli install-hook                  # afterwards plain `lm-eval --model qvlm-harness`
    python -m qvlm_harness.lmeval_cli uninstall-hook | hook-status

Every argument is lm-eval's (`lm-eval run --help`); model arguments are listed in `harness/lmeval/model.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from qvlm_harness.errors import HarnessError

HOOK_COMMANDS = ("install-hook", "uninstall-hook", "hook-status")


def _hook_command(command: str) -> int:
    from qvlm_harness.lmeval import hook

    if command == "install-hook":
        path = hook.install_hook()
        print(f"wrote {path}: `lm-eval --model qvlm-harness ...` now works in this environment")
        probe = subprocess.run([sys.executable, "-c", "import qvlm_harness.lmeval.hook"], cwd=os.path.expanduser("~"),
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, capture_output=True)
        if probe.returncode != 0:
            print("warning: `harness` is not importable outside this folder, so the hook stays inactive until the "
                  "package is installed: pip install -c constraints.txt -e '.[lmeval]'", file=sys.stderr)
        return 0
    if command == "uninstall-hook":
        path = hook.uninstall_hook()
        print(f"removed {path}" if path else f"no hook installed in {hook.site_dir()}")
        return 0
    path = os.path.join(hook.site_dir(), hook.PTH_NAME)
    print(f"hook {'installed' if os.path.exists(path) else 'not installed'}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in HOOK_COMMANDS:
            return _hook_command(args[0])
        try:
            from lm_eval.__main__ import cli_evaluate
        except ImportError:
            raise HarnessError("lm-eval is not installed: pip install -c constraints.txt 'qvlm-harness[lmeval]'"
                               ) from None
        from qvlm_harness.lmeval import register

        register()
        sys.argv = ["lm-eval", *args]
        cli_evaluate()
        return 0
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
