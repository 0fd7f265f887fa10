"""Where results go, checked before any work: a folder that is a file, or that cannot be written, would otherwise
be found at the first write, after a model was loaded, quantized and evaluated, and the cell would be lost.

The check writes: it creates and removes an empty probe file in the folder (or, when the folder does not exist
yet, in the nearest existing folder above it, where it will be created). Permission bits alone cannot tell (root
ignores them; a read-only mount or a full quota does not show in them).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qvlm_harness.errors import HarnessError

PROBE_PREFIX = ".harness-write-probe-"


def nearest_existing(path: Path) -> Path:
    """`path` itself when it exists, else its closest existing ancestor."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_write(folder: Path) -> None:
    """Create and remove an empty file in `folder` (an existing folder); raises OSError when it cannot."""
    fd, name = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
    os.close(fd)
    os.unlink(name)


def check_output_folder(path: Path | str, flag: str) -> None:
    """`path` is, or can be created as, a folder this process can write to; else one line naming `flag`."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise HarnessError(f"{flag} {target} is a file, not a folder; pass a folder (created when missing)")
    base = nearest_existing(target.absolute())
    if not base.is_dir():
        raise HarnessError(f"{flag} {target} cannot be created: {base} is a file; pass another folder")
    try:
        probe_write(base)
    except OSError as exc:
        where = "" if base == target.absolute() else f" (it would be created in {base})"
        raise HarnessError(f"{flag} {target} is not writable{where}: {exc.strerror or exc}; pass a folder you can "
                           "write to") from None


def check_output_file(path: Path | str, flag: str) -> None:
    """`path` can be written as a file: not a folder, and its folder is (or can be created) writable."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise HarnessError(f"{flag} {target} is a folder; pass a file path")
    if target.exists() and not os.access(target, os.W_OK):
        raise HarnessError(f"{flag} {target} is read-only; pass a file you can write")
    check_output_folder(target.parent if str(target.parent) else Path("."), flag)
