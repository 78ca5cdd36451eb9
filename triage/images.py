"""Pixel conversions shared by QC, embedding and reports, so all see the same image."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_grey_array(im: Image.Image) -> np.ndarray:
    """Greyscale float64 array in [0, 255] whatever the mode (16-bit, palette, alpha).

    Transparent pixels are composited on black (the usual background of scans). 16-bit
    and 32-bit data are stretched from their own min-max range: medical images often use
    10-12 of the 16 bits, and dividing by 65535 would make them almost black.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("L"), dtype=np.float64)


def to_grey_image(im: Image.Image) -> Image.Image:
    """8-bit greyscale PIL image (mode L) from any mode."""
    if im.mode == "L":
        return im
    if im.mode == "RGB":
        return im.convert("L")
    return Image.fromarray(np.clip(np.rint(to_grey_array(im)), 0, 255).astype(np.uint8))


def load_grey(path: str, size: int | None = None) -> Image.Image:
    """Open, fully decode, convert to L and optionally resize to ``size``x``size``."""
    with Image.open(path) as im:
        im.load()
        grey = to_grey_image(im)
    if size is not None and grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.BILINEAR)
    return grey
