"""Write tiny *real* image files (and deliberately broken ones) for the tests.

Every function writes with Pillow (or raw bytes for the broken cases) to the path it
is given, creates parent folders, and returns the path. Pixel content is random
texture from a seeded generator, so two calls with different seeds never produce
byte-identical files (which would otherwise trigger QC's duplicate detection).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from triage.testing import blob_image  # noqa: F401 - re-exported


def _prep(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def texture(size=(40, 40), seed: int = 0, lo: int = 30, hi: int = 225) -> np.ndarray:
    """uint8 greyscale random texture of ``size`` = (width, height)."""
    w, h = size
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi, size=(h, w), dtype=np.uint8)


def write_png(path, size=(40, 40), mode: str = "L", seed: int = 0) -> Path:
    """PNG of the given size and mode ('L', 'RGB', 'RGBA', 'LA', 'P')."""
    path = _prep(path)
    grey = texture(size, seed)
    im = Image.fromarray(grey, "L")
    if mode != "L":
        im = im.convert(mode)
    im.save(path, format="PNG")
    return path


def write_jpeg(path, size=(40, 40), seed: int = 0, mode: str = "L", quality: int = 90) -> Path:
    path = _prep(path)
    im = Image.fromarray(texture(size, seed), "L")
    if mode != "L":
        im = im.convert(mode)
    im.save(path, format="JPEG", quality=quality)
    return path


def jpeg_bytes(size=(40, 40), seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(texture(size, seed), "L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_truncated_jpeg(path, size=(64, 64), seed: int = 0) -> Path:
    """A valid JPEG cut in half: the header reads fine, the full decode fails."""
    path = _prep(path)
    data = jpeg_bytes(size, seed)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_zero_byte(path) -> Path:
    path = _prep(path)
    path.write_bytes(b"")
    return path


def write_text_as_image(path, text: str = "this is not an image\n") -> Path:
    """A text file with an image extension (e.g. ``notes.png``)."""
    path = _prep(path)
    path.write_text(text)
    return path


def write_rgba_png(path, size=(40, 40), seed: int = 0) -> Path:
    """RGBA PNG with a random texture and an alpha channel that is partly transparent."""
    path = _prep(path)
    grey = texture(size, seed)
    alpha = np.full_like(grey, 255)
    alpha[: grey.shape[0] // 4] = 128
    rgba = np.stack([grey, grey, grey, alpha], axis=-1)
    Image.fromarray(rgba, "RGBA").save(path, format="PNG")
    return path


def write_16bit_png(path, size=(40, 40), seed: int = 0, lo: int = 20000,
                    hi: int = 45000) -> Path:
    """16-bit greyscale PNG with values in [lo, hi) of the 0-65535 range."""
    path = _prep(path)
    w, h = size
    arr = np.random.default_rng(seed).integers(lo, hi, size=(h, w)).astype(np.uint16)
    Image.fromarray(arr).save(path, format="PNG")
    return path


def write_palette_png(path, size=(40, 40), seed: int = 0) -> Path:
    """Palette (mode P) PNG."""
    path = _prep(path)
    im = Image.fromarray(texture(size, seed), "L").convert("RGB")
    im.quantize(colors=64).save(path, format="PNG")
    return path


def write_tiny(path, seed: int = 0) -> Path:
    """1x1 PNG."""
    return write_png(path, size=(1, 1), seed=seed)


def write_blank(path, size=(40, 40), value: int = 128) -> Path:
    """Constant-valued greyscale PNG."""
    path = _prep(path)
    w, h = size
    Image.fromarray(np.full((h, w), value, np.uint8), "L").save(path, format="PNG")
    return path


def write_png_named_jpg(path, size=(40, 40), seed: int = 0) -> Path:
    """PNG content under whatever name is given (e.g. ``x.jpg``)."""
    path = _prep(path)
    Image.fromarray(texture(size, seed), "L").save(path, format="PNG")
    return path


def write_non_utf8_name(folder, stem: bytes = b"scan_\xff", ext: bytes = b".png",
                        size=(40, 40), seed: int = 0) -> bytes:
    """A valid PNG whose file name is not valid UTF-8; returns the bytes path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(texture(size, seed), "L").save(buf, format="PNG")
    bpath = os.fsencode(folder) + b"/" + stem + ext
    fd = os.open(bpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, buf.getvalue())
    finally:
        os.close(fd)
    return bpath


def write_unreadable(path, size=(40, 40), seed: int = 0) -> Path:
    """A valid PNG with permissions 000 (still readable by root)."""
    path = write_png(path, size=size, seed=seed)
    os.chmod(path, 0)
    return path


def make_layout(root, n_labeled=None, n_unlabeled: int = 4, n_test=None,
                size=(40, 40), seed: int = 0, ext: str = ".png") -> dict:
    """Build ``root/labeled/<class>/``, ``root/unlabeled/`` and (optionally) ``root/test/<class>/``.

    ``n_labeled`` / ``n_test`` map class name -> count (default 4 cancer + 4 normal
    labelled, no test folder). Every image is a distinct random texture. Returns
    {"root": Path, "labeled": {cls: [paths]}, "unlabeled": [paths], "test": {cls: [paths]}}.
    """
    root = Path(root)
    n_labeled = {"cancer": 4, "normal": 4} if n_labeled is None else n_labeled
    writer = write_jpeg if ext in (".jpg", ".jpeg") else write_png
    counter = [seed * 100_000]

    def nxt():
        counter[0] += 1
        return counter[0]

    out = {"root": root, "labeled": {}, "unlabeled": [], "test": {}}
    for cls, n in n_labeled.items():
        d = root / "labeled" / cls
        d.mkdir(parents=True, exist_ok=True)
        out["labeled"][cls] = [writer(d / f"{cls}_{i:03d}{ext}", size=size, seed=nxt())
                               for i in range(n)]
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    out["unlabeled"] = [writer(root / "unlabeled" / f"u_{i:03d}{ext}", size=size, seed=nxt())
                        for i in range(n_unlabeled)]
    if n_test is not None:
        for cls, n in n_test.items():
            d = root / "test" / cls
            d.mkdir(parents=True, exist_ok=True)
            out["test"][cls] = [writer(d / f"t_{cls}_{i:03d}{ext}", size=size, seed=nxt())
                                for i in range(n)]
    return out


def copy_file(src, dst) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def smooth_image(seed, size=64) -> Image.Image:
    rng = np.random.default_rng(seed)
    grid = rng.integers(20, 235, (6, 6), dtype=np.uint8)
    return Image.fromarray(grid, "L").resize((size, size), Image.Resampling.BICUBIC)


def write_smooth(path, seed, size=64) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    smooth_image(seed, size).save(path, format="PNG")
    return path


def write_upscaled_copy(src, dst) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC).save(dst, format="PNG")
    return dst
