"""Regenerate the embedded sample sets: `python -m qvlm_harness.tasks.samples.build [--out tasks/data]`.

Deterministic: the same package versions give byte-identical files; `MANIFEST.json` in each task folder lists
sha256 digests so a rebuild can be compared (`--check`). Evaluation splits use easy-VQA's test scenes, all other
splits its train scenes, so no evaluation image is ever seen in a train split or by the default model's training.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

from qvlm_harness.tasks.samples import generators as g
from qvlm_harness.tasks.samples.sources import load_scenes

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data"

# task -> split -> number of questions; eval splits (drawn from easy-VQA test scenes) are marked True
SIZES: dict[str, dict[str, tuple[int, bool]]] = {
    "sqa": {"train": (300, False), "val": (100, False), "test": (600, True)},
    "vqav2": {"train": (300, False), "val": (500, True)},
    "vizwiz": {"train": (200, False), "val": (400, True)},
    "hm": {"train": (200, False), "dev_seen": (400, True), "test_seen": (200, True)},
}
GENERATORS = {"sqa": g.generate_sqa, "vqav2": g.generate_vqav2, "vizwiz": g.generate_vizwiz, "hm": g.generate_hm}


def render(task: str, sizes: dict[str, tuple[int, bool]], seed: int) -> g.SampleFiles:
    splits = {split: (n, load_scenes("test" if is_eval else "train")) for split, (n, is_eval) in sizes.items()}
    return GENERATORS[task](splits, seed)


def encode_image(path: str, factory: g.ImageFactory) -> bytes:
    buf = io.BytesIO()
    image = factory()
    if path.endswith(".jpg"):
        image.save(buf, format="JPEG", quality=92)
    else:
        image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write(files: g.SampleFiles, folder: Path) -> dict[str, str]:
    """Write all files; returns {relative path: sha256}."""
    digests: dict[str, str] = {}
    items: list[tuple[str, bytes]] = [(p, t.encode()) for p, t in files.texts.items()]
    items += [(p, encode_image(p, f)) for p, f in files.images.items()]
    for rel, data in sorted(items):
        dest = folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def build(tasks: Sequence[str], out: Path, seed: int = 0, sizes: dict | None = None) -> dict[str, dict[str, str]]:
    manifests = {}
    for task in tasks:
        folder = out / task
        files = render(task, (sizes or SIZES)[task], seed)
        digests = write(files, folder)
        manifest = {"seed": seed, "sizes": {k: v[0] for k, v in (sizes or SIZES)[task].items()}, "files": digests}
        (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        manifests[task] = digests
    return manifests


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tasks", default=",".join(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="rebuild in memory and compare with the MANIFEST files")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    if args.check:
        bad = 0
        for task in tasks:
            manifest = json.loads((args.out / task / "MANIFEST.json").read_text())
            files = render(task, SIZES[task], manifest["seed"])
            now = {p: hashlib.sha256(t.encode()).hexdigest() for p, t in files.texts.items()}
            now |= {p: hashlib.sha256(encode_image(p, f)).hexdigest() for p, f in files.images.items()}
            diff = {p for p in set(now) | set(manifest["files"]) if now.get(p) != manifest["files"].get(p)}
            print(f"{task}: {'identical' if not diff else f'{len(diff)} files differ, e.g. {sorted(diff)[:3]}'}")
            bad += bool(diff)
        return 1 if bad else 0
    for task, digests in build(tasks, args.out, args.seed).items():
        print(f"{task}: {len(digests)} files -> {args.out / task}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
