"""How a sample request's values are read (a file path from the CLI, or bytes / text from a served request)."""
from __future__ import annotations

import io
import json

import numpy as np


def _open(src):
    from PIL import Image
    if isinstance(src, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(src)))
    return Image.open(src)


def _image(src, convert):
    from PIL import UnidentifiedImageError
    try:
        with _open(src) as im:
            return convert(im)
    except (OSError, UnidentifiedImageError) as e:
        name = "the image bytes" if isinstance(src, (bytes, bytearray, memoryview)) else src
        raise ValueError(f"{name}: not a readable image ({e}); give a PNG or JPEG") from None


def read_rgb(src) -> np.ndarray:
    """An image file (a path or its bytes) as an (h, w, 3) uint8 array."""
    return _image(src, lambda im: np.asarray(im.convert("RGB"), dtype=np.uint8))


def read_mask(src) -> np.ndarray:
    """A mask file (a path or its bytes) as an (h, w) bool array: white (> 127) is the hole to inpaint (SD's way)."""
    return _image(src, lambda im: np.asarray(im.convert("L"), dtype=np.uint8) > 127)


def read_label_map(src) -> np.ndarray:
    """A label map (a path or its bytes): an 8-bit grayscale or palette PNG whose pixel values are class ids."""
    def ids(im):
        if im.mode not in ("L", "P"):
            raise ValueError(f"a label map is an 8-bit grayscale or palette PNG of class ids, not mode {im.mode}")
        return np.asarray(im, dtype=np.uint8)
    return _image(src, ids)


def read_layout(src) -> dict:
    """A layout: JSON text, or a path to a JSON file, {"size": [H, W], "boxes": [[class, top, left, h, w], ...]}."""
    text = src if isinstance(src, str) and src.lstrip().startswith("{") else None
    try:
        if text is None:
            with open(src) as f:
                text = f.read()
        layout = json.loads(text)
    except (OSError, ValueError) as e:
        raise ValueError(f"layout {str(src)[:80]!r}: not readable JSON ({e})") from None
    if not isinstance(layout, dict) or not isinstance(layout.get("size"), list) or len(layout["size"]) != 2 \
            or not isinstance(layout.get("boxes"), list):
        raise ValueError(f'layout {str(src)[:80]!r}: give {{"size": [height, width], "boxes": [[class, top, left, '
                         f'height, width], ...]}} in pixels')
    return layout


def read_text(src) -> str:
    return str(src)
