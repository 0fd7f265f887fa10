"""What a cell is: the contents it was computed from, not the paths it was read from.

A cell's id hashes its *identity*: the model's content fingerprint (every file of the checkpoint folder), the
data's (every evaluated sample's fields and image bytes; the few-shot pool and the calibration samples where they
are used), the method's canonical config, the spec, and every setting that can change a result. Editing
`problems.json` in place, overwriting a checkpoint folder or changing a default-valued option to another value
gives another id, so a stale row is never reused; spelling a default out gives the same id.

File hashes are cached by (path, size, mtime) in the harness cache (`fingerprints.json`), so a 600 MB checkpoint
is read once, not at every plan. JSON files are hashed without the keys that record where or with which
transformers release a checkpoint was written (`_name_or_path`, `_commit_hash`, `transformers_version`), so the
same weights built in another folder or by another release keep their identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qvlm_harness.task import Sample

IDENTITY_VERSION = 2  # bump when what a cell id covers changes meaning
VOLATILE_JSON_KEYS = frozenset({"_name_or_path", "_commit_hash", "transformers_version"})
_CACHE_NAME = "fingerprints.json"
_lock = threading.Lock()


# -- file hashes, cached by stat ------------------------------------------------------------------------------------
def _cache_path() -> Path:
    from qvlm_harness.models.default import cache_root

    return cache_root() / _CACHE_NAME


def _load_cache() -> dict[str, dict]:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict[str, dict]) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache costs re-hashing next time, nothing else


def _strip_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if k not in VOLATILE_JSON_KEYS}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def _hash_file(path: Path) -> str:
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return hashlib.sha256(json.dumps(_strip_volatile(data), sort_keys=True).encode()).hexdigest()
        except (UnicodeDecodeError, ValueError):
            pass  # not JSON after all: hash the bytes
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of each file's content (JSON without provenance keys), from the stat-keyed cache when unchanged."""
    out: dict[str, str] = {}
    with _lock:
        cache = _load_cache()
        dirty = False
        for p in paths:
            p = Path(p).expanduser().resolve()
            st = p.stat()
            key = str(p)
            hit = cache.get(key)
            if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
                out[key] = hit["sha256"]
                continue
            digest = _hash_file(p)
            cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            out[key] = digest
            dirty = True
        if dirty:
            _save_cache(cache)
    return out


def folder_fingerprint(folder: Path) -> str:
    """The content fingerprint of a checkpoint folder: every file, by relative path (hidden files aside)."""
    folder = Path(folder).expanduser().resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                           p.relative_to(folder).parts))
    digests = file_digests(files)
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        h.update(digests[str(p)].encode())
    return h.hexdigest()[:16]


def model_fingerprint(path_or_id: str) -> str:
    """Content fingerprint of a model: a local folder's files; a hub id's local snapshot when cached (else the id
    itself, marked `hub:`: the load will fetch it, and its revision is what the hub serves)."""
    local = Path(str(path_or_id)).expanduser()
    if local.is_dir():
        return folder_fingerprint(local)
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(str(path_or_id), local_files_only=True)
        return folder_fingerprint(Path(snapshot))
    except Exception:
        return f"hub:{path_or_id}"


# -- data -------------------------------------------------------------------------------------------------------------
def _image_digest(image: Any) -> str | None:
    if image is None:
        return None
    if isinstance(image, str | Path):
        p = Path(image)
        if p.is_file():
            return file_digests([p])[str(p.expanduser().resolve())]
        return f"missing:{p}"  # the loader reports it when the sample is answered
    if isinstance(image, bytes | bytearray):
        return hashlib.sha256(bytes(image)).hexdigest()
    tobytes = getattr(image, "tobytes", None)
    if callable(tobytes):  # a PIL image
        h = hashlib.sha256(f"{getattr(image, 'mode', '')}{getattr(image, 'size', '')}".encode())
        h.update(tobytes())
        return h.hexdigest()
    return hashlib.sha256(repr(image).encode()).hexdigest()


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """What a set of samples contains: ids, every field the task loaded, and the image bytes."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.id.encode())
        h.update(json.dumps(s.data, sort_keys=True, default=str).encode())
        h.update(str(_image_digest(s.image)).encode())
    return h.hexdigest()[:16]


# -- the id -----------------------------------------------------------------------------------------------------------
def cell_digest(identity: Mapping[str, Any]) -> str:
    text = json.dumps({"identity_version": IDENTITY_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
