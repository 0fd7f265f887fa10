"""Image sources for the embedded sample sets: easy-VQA scenes (with attributes) and packaged photographs.

easy-VQA (MIT, PyPI `easy-vqa==1.0`) ships 64x64 scenes, each one shape in one colour on a tinted background.
Its questions are biased templates, so we do not reuse them; instead we read every scene's attributes from its
pixels (colour = the dominant non-background palette colour, shape = how much of its bounding box the shape
fills, position and size from the mask) and write our own balanced questions. `check_against_questions`
verifies the pixel-derived labels against the labels implied by easy-VQA's own questions.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("circle", "rectangle", "triangle")
# easy-VQA draws with these exact RGB values (read off the images); names are its answer words.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}
COLORS = tuple(PALETTE)
CORNERS = {"circle": 0, "rectangle": 4, "triangle": 3}


@dataclass(frozen=True)
class Scene:
    """One easy-VQA image and what is in it."""

    split: str  # "train" | "test" (easy-VQA's own split)
    index: int
    path: Path
    shape: str
    color: str
    area: float  # fraction of the image the shape covers
    cx: float  # centroid, 0 (left/top) .. 1 (right/bottom)
    cy: float

    @property
    def horizontal(self) -> str | None:
        """'left' / 'right' when the shape is clearly on one side, else None."""
        if self.cx < 0.4:
            return "left"
        if self.cx > 0.6:
            return "right"
        return None


def easyvqa_dir() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "easy-vqa is not installed: `pip install easy-vqa==1.0` (needed only to rebuild the sample sets)"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def read_scene(path: Path, split: str, index: int) -> Scene:
    """Attributes of one easy-VQA image from its pixels."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    flat = rgb.reshape(-1, 3)
    names = list(PALETTE)
    pal = np.array([PALETTE[n] for n in names])
    dist = np.abs(flat[:, None, :] - pal[None, :, :]).sum(-1)  # L1 to each palette colour
    nearest = dist.argmin(1)
    exact = dist.min(1) <= 24
    counts = np.bincount(nearest[exact], minlength=len(names))
    color = names[int(counts.argmax())]
    mask = (np.abs(rgb - np.array(PALETTE[color])).sum(-1) <= 90)
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    # A filled rectangle fills its box (~1.0), a circle pi/4 (~0.79), a triangle half of it (~0.5).
    shape = "rectangle" if fill > 0.9 else ("circle" if fill > 0.64 else "triangle")
    return Scene(split, index, path, shape, color, float(mask.mean()), float(xs.mean() / (w - 1)),
                 float(ys.mean() / (h - 1)))


MIN_AREA_UNLABELLED = 0.03  # below this, tiny anti-aliased shapes are ambiguous from pixels alone


@lru_cache(maxsize=2)
def load_scenes(split: str) -> tuple[Scene, ...]:
    """The usable easy-VQA scenes of a split ('train' or 'test'), in index order.

    easy-VQA's own questions name the shape of most scenes; that label wins over the pixel estimate (they
    disagree only on shapes a few pixels wide). Tiny scenes with no such label are left out.
    """
    folder = easyvqa_dir() / split / "images"
    paths = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))
    labels = labels_from_questions(split)
    scenes = []
    for p in paths:
        scene = read_scene(p, split, int(p.stem))
        known = labels.get(scene.index, {})
        if "shape" in known:
            scene = replace(scene, shape=known["shape"])
        elif scene.area < MIN_AREA_UNLABELLED:
            continue
        scenes.append(scene)
    return tuple(scenes)


def labels_from_questions(split: str) -> dict[int, dict[str, str]]:
    """Shape/colour labels implied by easy-VQA's own questions (used only to validate `read_scene`)."""
    import json

    data = json.loads((easyvqa_dir() / split / "questions.json").read_text())
    out: dict[int, dict[str, str]] = {}
    for question, answer, image in data:
        lab = out.setdefault(int(image), {})
        if m := re.fullmatch(r"what is the (\w+) shape\?", question):
            lab["color"], lab["shape"] = m.group(1), answer
        elif answer in COLORS:
            lab["color"] = answer
            if m := re.search(r"the (circle|rectangle|triangle)\?$", question):
                lab["shape"] = m.group(1)
        elif (answer == "yes" and " not " not in question and " no " not in question
              and (m := re.search(r"(?:contain|there|is) an? (circle|rectangle|triangle)", question))):
            lab["shape"] = m.group(1)
    return out


def check_against_questions(split: str) -> dict[str, float]:
    """Agreement of pixel-derived labels with question-derived labels (expected 1.0 for both)."""
    folder = easyvqa_dir() / split / "images"
    scenes = [read_scene(p, split, int(p.stem)) for p in sorted(folder.glob("*.png"), key=lambda p: int(p.stem))]
    labels = labels_from_questions(split)
    agree = {"shape": [0, 0], "color": [0, 0]}
    for s in scenes:
        for key in ("shape", "color"):
            if key in labels.get(s.index, {}):
                agree[key][0] += labels[s.index][key] == getattr(s, key)
                agree[key][1] += 1
    return {k: a / max(n, 1) for k, (a, n) in agree.items()} | {f"n_{k}": n for k, (_, n) in agree.items()}


@dataclass(frozen=True)
class Photo:
    """A real photograph shipped inside a PyPI package, with facts a question can ask about."""

    name: str
    subject: str  # what the photo shows, one or two words
    kind: str  # "animal" | "person" | "object" | "place" | "plant"
    colour: str | None  # dominant, clearly visible colour of the subject, when there is one
    count: int | None  # how many of the subject are visible, when countable

    def load(self) -> Image.Image:
        return _load_photo(self.name)


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "astronaut", "person", "white", 1),
    Photo("chelsea", "cat", "animal", "orange", 1),
    Photo("coffee", "coffee", "object", "white", 1),
    Photo("rocket", "rocket", "object", "white", 1),
    Photo("camera", "man", "person", None, 1),
    Photo("horse", "horse", "animal", "black", 1),
    Photo("hubble_deep_field", "galaxies", "place", None, None),
    Photo("immunohistochemistry", "cells", "object", "brown", None),
    Photo("coins", "coins", "object", "gray", 24),
    Photo("grace_hopper", "woman", "person", None, 1),
    Photo("china", "temple", "place", None, 1),
    Photo("flower", "flower", "plant", "pink", 1),
)


def _load_photo(name: str) -> Image.Image:
    if name == "grace_hopper":
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return Image.open(f).convert("RGB")
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg")).convert("RGB")
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr).convert("RGB")
