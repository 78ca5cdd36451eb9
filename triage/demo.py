"""Deterministic synthetic mammography-like data for the triage demo.

Why synthetic: the pipeline must run end to end (and be tested) without
downloading a real, licence-restricted medical data set. The generator is
built so the *shape* of the real problem survives:

* the malignant cue is local and morphological (irregular, spiculated
  masses), not a global brightness shift, so a model has to look at the
  lesion itself;
* normals sometimes contain smooth benign masses and every image has
  vessels and dense-tissue blobs, so "there is a bright thing" or "there is
  a line" is not enough (hard negatives);
* lesion size and contrast vary a lot, so some cancers are subtle.

With the defaults, a random-init ResNet18 embedding plus logistic regression
on 100 labels reaches a mediocre test ROC-AUC, while the same classifier fit
on the (truly labelled) unlabelled pool does clearly better; that gap is the
room semi-supervision is supposed to exploit.

Everything is numpy + Pillow only and every image gets its own generator
seeded from ``(seed, split, index)``, so bytes do not depend on ``workers``
or on execution order.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CLASSES = ("normal", "cancer")  # folder names; positive class is "cancer"

_SPLIT_CODES = {"labeled": 0, "unlabeled": 1, "test": 2}

# Tunables at image_size=128 (lengths in pixels scale linearly with size).
# Chosen so the default task is learnable but far from trivial; see the
# module docstring. Kept module-level so a tuning script can override them.
_MASS_RADIUS = (8.0, 24.0)  # lesion radius range, both mass types
_MASS_CONTRAST = (2.5, 6.0)  # log-uniform, in tissue-std units, both mass types
_SPICULE_COUNT = (8, 24)  # inclusive range; 0 = irregular-only lesion
_SPICULE_REL_AMP = (0.5, 1.0)  # spicule brightness relative to the mass
_SPICULE_LEN = (1.0, 3.0)  # spicule length beyond the boundary / radius
_IRREGULARITY = 0.16  # harmonic amplitude of the cancer boundary
_VESSELS_MEAN = 1.0  # Poisson mean of curvilinear vessels (both classes)
_CALC_MAX = 4  # scattered benign calcification specks (both classes)
_WINDOW_MEAN = (0.33, 0.45)  # per-image display window (label-independent)
_WINDOW_STD = (0.14, 0.2)
_ORGAN_AX = (0.9, 1.2)  # breast half-ellipse semi-axes / image size
_ORGAN_AY = (0.6, 0.85)
_GLAND_AMP = 0.22  # dense-tissue blob brightness
_FINE_AMP = (0.02, 0.05)  # fine texture amplitude
_ANISO = (1.0, 1.8)  # texture streakiness
_DENSITY = (0.2, 0.75)  # breast density (fraction of dense tissue)


def _check_probability(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_render_args(image_size: int, difficulty: float, benign_mass_rate: float) -> None:
    if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    if not (float(difficulty) > 0.0) or not math.isfinite(float(difficulty)):
        raise ValueError(f"difficulty must be a finite number > 0, got {difficulty!r}")
    _check_probability("benign_mass_rate", benign_mass_rate)


@functools.lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


@functools.lru_cache(maxsize=8)
def _freq(n: int) -> tuple[np.ndarray, np.ndarray]:
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    return fy, fx


def _smooth_noise(rng, n, sigmas, weights, aniso=1.0, theta=0.0) -> np.ndarray:
    """Multi-scale, optionally oriented Gaussian noise via one FFT.

    One FFT with a summed Gaussian transfer function is ~10x cheaper than a
    large-sigma ``gaussian_filter`` per scale, which keeps the whole default
    set within a few seconds. Each scale is normalised to unit std so the
    weights mean what they say; anisotropy mimics the ductal streaking of
    breast tissue. Wrap-around at the borders is invisible in practice.
    """
    fy, fx = _freq(n)
    c, s = math.cos(theta), math.sin(theta)
    u = c * fx + s * fy
    v = -s * fx + c * fy
    f2 = (u * aniso) ** 2 + (v / aniso) ** 2
    h = np.zeros_like(f2)
    for sigma, weight in zip(sigmas, weights):
        h += weight * 2.0 * sigma * math.sqrt(math.pi) * np.exp(-2.0 * math.pi**2 * sigma**2 * f2)
    spec = np.fft.rfft2(rng.standard_normal((n, n)))
    return np.fft.irfft2(spec * h, s=(n, n))


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _log_uniform(rng, lo, hi) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _window(n, cx, cy, half):
    """Local slice around a lesion so per-lesion maths costs O(lesion area)."""
    x0, x1 = max(0, int(cx - half)), min(n, int(cx + half) + 1)
    y0, y1 = max(0, int(cy - half)), min(n, int(cy + half) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    return (slice(y0, y1), slice(x0, x1)), xx - cx, yy - cy


def _cancer_mass(rng, img, cx, cy, radius, contrast, s, difficulty, fine):
    """Irregular, heterogeneous, spiculated lesion (BI-RADS-like malignant cues).

    Malignancy is carried by *shape*: a boundary modulated by random
    low-order harmonics and thin radiating spicules. Brightness alone is
    drawn from the same distribution as benign masses.
    """
    n = img.shape[0]
    n_sp = int(rng.integers(_SPICULE_COUNT[0], _SPICULE_COUNT[1] + 1))
    sp_len = radius * rng.uniform(*_SPICULE_LEN, size=n_sp)
    half = radius * (1.0 + 3.5 * _IRREGULARITY) + (sp_len.max() if n_sp else 0.0) + 4.0 * s
    win, dx, dy = _window(n, cx, cy, half)
    dist = np.hypot(dx, dy)
    ang = np.arctan2(dy, dx)

    irr = _IRREGULARITY / math.sqrt(difficulty)
    r_theta = np.ones_like(ang)
    for k in range(2, 9):
        a = rng.normal(0.0, irr / math.sqrt(k - 1))
        r_theta += a * np.cos(k * ang + rng.uniform(0, 2 * math.pi))
    r_theta = radius * np.clip(r_theta, 0.45, 1.8)
    edge = s * rng.uniform(0.7, 1.8)
    body = _sigmoid((r_theta - dist) / edge)
    core = 0.8 + 0.2 * np.clip(1.0 - dist / radius, 0.0, 1.0)
    hetero = np.clip(1.0 + rng.uniform(0.15, 0.35) * fine[win], 0.5, 1.5)
    lesion = contrast * body * core * hetero

    if n_sp:
        rel = rng.uniform(*_SPICULE_REL_AMP, size=n_sp) / math.sqrt(difficulty)
        h, w = dx.shape
        for theta, length, amp in zip(rng.uniform(0, 2 * math.pi, size=n_sp), sp_len, rel):
            width = s * rng.uniform(0.55, 1.1)
            bend = rng.normal(0.0, 0.12) * length
            c, sn = math.cos(theta), math.sin(theta)
            start = radius * 0.6
            tip = radius + length
            # Only touch the spicule's own bounding box: cost ~ its length.
            pad = 3.0 * width + abs(bend) + 1.0
            xs = (start * c, tip * c)
            ys = (start * sn, tip * sn)
            cols = np.searchsorted(dx[0], (min(xs) - pad, max(xs) + pad))
            rows = np.searchsorted(dy[:, 0], (min(ys) - pad, max(ys) + pad))
            sub = (slice(rows[0], min(h, rows[1] + 1)), slice(cols[0], min(w, cols[1] + 1)))
            sx, sy = dx[sub], dy[sub]
            along = sx * c + sy * sn
            t = (along - start) / (tip - start)
            perp = -sx * sn + sy * c - bend * np.clip(t, 0, 1) ** 2
            taper = np.clip(1.0 - t, 0.0, 1.0) * (along > start)
            lesion[sub] += contrast * amp * taper * np.exp(-((perp / width) ** 2))
    img[win] += lesion


def _benign_mass(rng, img, cx, cy, radius, contrast, s):
    """Circumscribed oval with a soft, smooth margin (fibroadenoma/cyst-like).

    Same size/brightness distribution as cancers, so it is a hard negative:
    only the smooth, homogeneous shape tells it apart.
    """
    n = img.shape[0]
    half = radius * 1.25 + 4.0 * s
    win, dx, dy = _window(n, cx, cy, half)
    theta = rng.uniform(0, math.pi)
    c, sn = math.cos(theta), math.sin(theta)
    u = dx * c + dy * sn
    v = -dx * sn + dy * c
    b = radius * rng.uniform(0.6, 1.0)
    e = np.sqrt((u / radius) ** 2 + (v / b) ** 2)
    ang = np.arctan2(v, u)
    lobes = 1.0 + rng.uniform(0.0, 0.05) * np.cos(2 * ang + rng.uniform(0, 2 * math.pi))
    edge = s * rng.uniform(1.0, 2.5)
    body = _sigmoid((lobes - e) * b / edge)
    img[win] += contrast * rng.uniform(0.9, 1.05) * body


def render_image(
    rng: np.random.Generator,
    is_cancer: bool,
    image_size: int = 128,
    difficulty: float = 1.0,
    benign_mass_rate: float = 0.35,
) -> np.ndarray:
    """One uint8 HxW image.

    ``difficulty`` (>0, 1 = default) divides lesion contrast and spiculation
    and shrinks lesions; it applies to benign masses too so they stay
    matched hard negatives. ``benign_mass_rate`` is the fraction of normals
    that get a smooth benign mass.
    """
    _check_render_args(image_size, difficulty, benign_mass_rate)
    n = int(image_size)
    s = n / 128.0
    yy, xx = _grid(n)

    # Breast outline: half-ellipse against the chest wall on a random side,
    # dark air outside, fatty (darker) towards the skin line.
    left = bool(rng.integers(2))
    cx = (-0.05 if left else 1.05) * n
    cy = n * rng.uniform(0.4, 0.6)
    ax = n * rng.uniform(*_ORGAN_AX)
    ay = n * rng.uniform(*_ORGAN_AY)
    e = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    organ = _sigmoid((1.0 - e) * min(ax, ay) / (2.5 * s))
    depth = np.clip(1.0 - e, 0.0, 1.0)

    # Fibroglandular tissue: soft-thresholded smooth noise gives dense blobs
    # (natural mass look-alikes) on top of finer oriented texture.
    theta = rng.uniform(0, math.pi)
    aniso = rng.uniform(*_ANISO)
    coarse = _smooth_noise(rng, n, (6 * s, 16 * s), (0.6, 0.8), aniso, theta)
    fine = _smooth_noise(rng, n, (1.0 * s, 2.0 * s), (0.5, 0.8), aniso, theta)
    density = rng.uniform(*_DENSITY)
    glands = _sigmoid(2.5 * (coarse + 1.5 * depth - 1.8 * (1.0 - density)))
    tissue = 0.28 + 0.12 * depth + _GLAND_AMP * glands + rng.uniform(*_FINE_AMP) * fine

    # Vessels / ducts: faint gently curved lines in every image so that
    # "contains a line" is not a cancer shortcut.
    for _ in range(int(rng.poisson(_VESSELS_MEAN))):
        phi = rng.uniform(0, math.pi)
        c, sn = math.cos(phi), math.sin(phi)
        px, py = rng.uniform(0.2, 0.8, size=2) * n
        u = (xx - px) * c + (yy - py) * sn
        v = -(xx - px) * sn + (yy - py) * c
        curve = rng.normal(0.0, 0.004 / s)
        width = s * rng.uniform(0.6, 1.3)
        tissue += rng.uniform(0.03, 0.08) * np.exp(-(((v - curve * u**2) / width) ** 2))

    for _ in range(int(rng.integers(0, _CALC_MAX + 1))):
        px, py = rng.uniform(0.15, 0.85, size=2) * n
        win, dx, dy = _window(n, px, py, 3.0 * s)
        tissue[win] += rng.uniform(0.05, 0.15) * np.exp(-(dx**2 + dy**2) / (2 * (0.7 * s) ** 2))

    # Lesion, placed inside the breast (elliptic coordinates from the chest
    # wall). It is drawn on its own layer in units of the tissue std, so its
    # conspicuity is a contrast-to-texture ratio whatever the tissue density.
    lesion = np.zeros((n, n))
    has_benign = (not is_cancer) and rng.random() < benign_mass_rate
    if is_cancer or has_benign:
        radius = s * rng.uniform(*_MASS_RADIUS) / difficulty**0.35
        contrast = _log_uniform(rng, *_MASS_CONTRAST) / difficulty
        rho = rng.uniform(0.15, 0.7)
        phi = rng.uniform(-0.42 * math.pi, 0.42 * math.pi)
        mx = cx + (1 if left else -1) * rho * ax * math.cos(phi)
        my = cy + rho * ay * math.sin(phi)
        mx = float(np.clip(mx, radius, n - 1 - radius))
        my = float(np.clip(my, radius, n - 1 - radius))
        if is_cancer:
            _cancer_mass(rng, lesion, mx, my, radius, contrast, s, difficulty, fine)
        else:
            _benign_mass(rng, lesion, mx, my, radius, contrast, s)

    r2 = ((xx - n / 2) ** 2 + (yy - n / 2) ** 2) / (n / 2) ** 2
    falloff = (1.0 - rng.uniform(0.05, 0.2) * r2) * organ  # detector falloff
    background = 0.04 + falloff * tissue
    # Display windowing: real mammograms are auto-windowed per image. Taking
    # the window statistics over the whole image (lesion included) and
    # drawing the target mean/std independently of the label removes the
    # "a mass adds brightness" global-statistics shortcut.
    img = background + falloff * tissue.std() * lesion
    img = (img - img.mean()) / (img.std() + 1e-8)
    img = rng.uniform(*_WINDOW_MEAN) + rng.uniform(*_WINDOW_STD) * img
    noise_sd = np.sqrt((0.04 * np.clip(img, 0.0, None)) ** 2 + 0.012**2)
    img += noise_sd * rng.standard_normal((n, n))  # quantum + read-out noise
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _render_and_save(task) -> None:
    """Worker body; seeds from (seed, split, index) so scheduling is irrelevant."""
    seed, code, index, is_cancer, path, image_size, difficulty, benign_mass_rate = task
    rng = np.random.default_rng([seed, code, index])
    arr = render_image(rng, is_cancer, image_size, difficulty, benign_mass_rate)
    Image.fromarray(arr, mode="L").save(path, format="PNG", optimize=False)


def _shuffled_labels(seed: int, code: int, n: int, n_cancer: int) -> np.ndarray:
    labels = np.zeros(n, dtype=bool)
    labels[:n_cancer] = True
    return np.random.default_rng([seed, code, 2**31]).permutation(labels)


def generate_demo(
    out_dir,
    *,
    n_labeled: int = 100,
    n_unlabeled: int = 1406,
    n_test: int = 300,
    prevalence: float = 0.3,
    test_prevalence: float = 0.5,
    image_size: int = 128,
    difficulty: float = 1.0,
    benign_mass_rate: float = 0.35,
    seed: int = 0,
    workers: int = 1,
) -> pd.DataFrame:
    """Write the folder layout and return the hidden truth of the unlabelled pool.

    Layout: ``labeled/{cancer,normal}``, ``unlabeled/`` (flat, names carry no
    label), ``test/{cancer,normal}``; files are ``img_{index:05d}.png`` with
    labels shuffled over indices. The three subfolders are deleted and
    recreated, so stale images from an earlier call never leak in. Labelled
    set is 50/50 (odd: one extra normal); unlabelled and test use
    ``round(prevalence * n)`` cancers. Returns columns ``path`` (POSIX,
    relative to ``out_dir``) and ``label``, sorted by path.
    """
    n_labeled = _check_count("n_labeled", n_labeled)
    n_unlabeled = _check_count("n_unlabeled", n_unlabeled)
    n_test = _check_count("n_test", n_test)
    prevalence = _check_probability("prevalence", prevalence)
    test_prevalence = _check_probability("test_prevalence", test_prevalence)
    _check_render_args(image_size, difficulty, benign_mass_rate)
    seed = _check_count("seed", seed)
    workers = _check_count("workers", workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in _SPLIT_CODES:
        shutil.rmtree(out / split, ignore_errors=True)
    for split in ("labeled", "test"):
        for cls in CLASSES:
            (out / split / cls).mkdir(parents=True)
    (out / "unlabeled").mkdir()

    counts = {
        "labeled": (n_labeled, n_labeled // 2),
        "unlabeled": (n_unlabeled, round(prevalence * n_unlabeled)),
        "test": (n_test, round(test_prevalence * n_test)),
    }
    tasks, truth = [], []
    for split, code in _SPLIT_CODES.items():
        n, n_cancer = counts[split]
        for index, is_cancer in enumerate(_shuffled_labels(seed, code, n, n_cancer)):
            label = CLASSES[int(is_cancer)]
            rel = f"{split}/img_{index:05d}.png" if split == "unlabeled" else f"{split}/{label}/img_{index:05d}.png"
            if split == "unlabeled":
                truth.append((rel, label))
            tasks.append((seed, code, index, bool(is_cancer), os.fspath(out / rel),
                          int(image_size), float(difficulty), float(benign_mass_rate)))

    if workers == 1 or len(tasks) < 2:
        for task in tasks:
            _render_and_save(task)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_render_and_save, tasks, chunksize=max(1, len(tasks) // (4 * workers))):
                pass

    df = pd.DataFrame(truth, columns=["path", "label"])
    return df.sort_values("path", ignore_index=True)
