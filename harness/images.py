"""Image loading with errors a user can act on (missing file, corrupt file) instead of PIL tracebacks."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from qvlm_harness.errors import DataError


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
