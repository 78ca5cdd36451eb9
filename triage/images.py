"""Pixel conversions shared by QC, embedding and reports, so all see the same image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112  # 1 = upright; 2-8 = mirrored and/or rotated (phone captures)


def exif_orientation(im: Image.Image) -> int:
    """The image's EXIF orientation tag (1 when absent or unreadable)."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no orientation
        return 1


def upright(im: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: EXIF orientation applied (a copy only when the
    tag says the pixels are stored rotated or mirrored). QC, embedding, reports and
    inference all read pixels through this, so a rotated capture is never embedded sideways."""
    return ImageOps.exif_transpose(im) if exif_orientation(im) != 1 else im


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
        grey = to_grey_image(upright(im))
    if size is not None and grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.BILINEAR)
    return grey


# --------------------------------------------------------------------------- perceptual hash

PHASH_SIZE = 32   # the image is reduced to PHASH_SIZE x PHASH_SIZE before the DCT
PHASH_LOW = 8     # the LOW x LOW lowest frequencies give the 64 bits


def phash64(grey: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a greyscale array (any size, values 0-255).

    Reduce to 32x32 (box filter, so large images cost one pass), 2-D DCT-II, keep the
    8x8 lowest frequencies and set each bit when the coefficient exceeds their median
    (DC term left out of the median). Re-encoded, resized or lightly retouched copies of
    an image land within a few bits; unrelated images differ by ~32 bits on average.
    Bit order: row-major over the 8x8 block, first coefficient = most significant bit.
    """
    from scipy.fft import dctn

    small = Image.fromarray(np.asarray(grey, dtype=np.float32), "F").resize(
        (PHASH_SIZE, PHASH_SIZE), Image.Resampling.BOX)
    coef = dctn(np.asarray(small, dtype=np.float64), type=2, norm="ortho")
    low = coef[:PHASH_LOW, :PHASH_LOW].ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_hex(value: int) -> str:
    return f"{value:016x}"


def hamming_within(hashes: np.ndarray, max_distance: int, block: int | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of uint64 hashes at Hamming distance <= ``max_distance``.

    Vectorised in row blocks (XOR + popcount of a block against the hashes after it), so
    50k hashes need ~1.25e9 popcounts in C, no Python loop over pairs, and a block holds
    at most ~16M uint64 (128 MB). Returns (i, j, distance) arrays sorted by (i, j).
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if block is None:
        block = max(16, min(1024, (1 << 24) // max(n, 1)))
    ii, jj, dd = [], [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        dist = np.bitwise_count(h[start:stop, None] ^ h[None, start:])
        r, c = np.nonzero(dist <= max_distance)
        keep = c > r  # c is relative to start too: pairs after the diagonal only
        r, c = r[keep], c[keep]
        ii.append(r + start), jj.append(c + start), dd.append(dist[r, c])
    if not ii:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return (np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64),
            np.concatenate(dd).astype(np.int64))
