"""Image loading with errors a user can act on (missing file, corrupt file) instead of PIL tracebacks, and the
planner's check that every image a run will use opens and decodes, before any model is loaded.

`check_images` decodes each image with `load_image`, the very function evaluation uses, so what passes here
loads there and a bad file gets the same one-line message, only minutes earlier. Images that passed are
remembered by (path, size, mtime): in this process and in the harness cache (`images_checked.json`), so
re-planning a run (`harness validate` then `harness run`, a Ray worker, each `harness ablate` combination) decodes
nothing twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from qvlm_harness.errors import DataError

_CACHE_NAME = "images_checked.json"
_lock = threading.Lock()
_checked: dict[str, tuple[int, int]] = {}  # resolved path (or "sha1:<digest>" of bytes) -> (size, mtime_ns)


def load_image(source: str | Path | bytes | Image.Image, *, what: str = "image") -> Image.Image:
    """An RGB PIL image from a path, raw bytes or an image; `what` names the sample in error messages."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        if isinstance(source, bytes | bytearray):
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise DataError(f"missing image for {what}: {path} does not exist; check --data-dir and the layout "
                                "shown by `harness ls tasks`")
            image = Image.open(path)
        image.load()
        return image.convert("RGB")
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        where = source if not isinstance(source, bytes | bytearray) else "<bytes>"
        raise DataError(f"corrupt image for {what}: {where} cannot be decoded ({type(exc).__name__}); "
                        "replace the file or remove the sample") from exc


def _cache_path() -> Path:
    from qvlm_harness.models.default import cache_root

    return cache_root() / _CACHE_NAME


def _load_cache() -> dict[str, tuple[int, int]]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: (v[0], v[1]) for k, v in data.items() if isinstance(v, list) and len(v) == 2}


def _save_cache(entries: dict[str, tuple[int, int]]) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: list(v) for k, v in entries.items()}))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache costs decoding again next time, nothing else


def _key(source: Any) -> tuple[str, tuple[int, int]] | None:
    """The cache key and stamp of an image source (None for a missing file: `load_image` reports it)."""
    if isinstance(source, bytes | bytearray):
        return "sha1:" + hashlib.sha1(bytes(source)).hexdigest(), (len(source), 0)
    path = Path(source).expanduser()
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path.resolve()), (st.st_size, st.st_mtime_ns)


def check_images(images: Iterable[tuple[str, Any]]) -> int:
    """Open and decode every image of `(what, source)` pairs (paths or bytes; anything else, such as None, a
    decoded image or a task's lazy reference, is skipped), raising `load_image`'s one-line `DataError` for the
    first that fails. Returns how many were decoded now (the rest were known good)."""
    decoded = 0
    with _lock:
        known: dict[str, tuple[int, int]] | None = None
        fresh: dict[str, tuple[int, int]] = {}
        try:
            for what, source in images:
                if not isinstance(source, str | Path | bytes | bytearray):
                    continue  # none, decoded already, or a task's own lazy reference (an lm-eval document's)
                key = _key(source)
                if key is not None and _checked.get(key[0]) == key[1]:
                    continue
                if key is not None and not isinstance(source, bytes | bytearray):
                    if known is None:
                        known = _load_cache()
                    if known.get(key[0]) == key[1]:
                        _checked[key[0]] = key[1]
                        continue
                load_image(source, what=what)
                decoded += 1
                if key is not None:
                    _checked[key[0]] = key[1]
                    if not key[0].startswith("sha1:"):
                        fresh[key[0]] = key[1]
        finally:  # what passed stays known even when a later image fails
            if fresh:
                _save_cache((known if known is not None else _load_cache()) | fresh)
    return decoded
