"""Greyscale augmentations for fine-tuning (FixMatch weak/strong) and SimCLR pretraining.

Batched torch ops on ``(N, 1, H, W)`` tensors; every random draw comes from the
``torch.Generator`` passed in, so a seeded generator gives the same views on any run.
Only geometry and *intensity* ops appropriate for single-channel medical images:
no hue, saturation or other colour jitter (the images have no colour).

Outputs are float32 in [0, 1] with the input's shape.
"""

from __future__ import annotations

import math

# Intensity ops of the strong view (RandAugment-like, greyscale only). Names are checked
# by tests: nothing here may touch colour.
INTENSITY_OPS = ("contrast", "brightness", "gamma", "autocontrast", "equalize", "sharpness",
                 "blur", "posterize")


def _uniform(g, n: int, lo: float, hi: float):
    import torch

    return lo + (hi - lo) * torch.rand(n, generator=g)


def random_affine(x, g, *, max_rotate: float = 10.0, max_translate: float = 0.0625,
                  scale: tuple[float, float] = (0.9, 1.1), flip: bool = True):
    """Per-sample flip, rotation (degrees), translation (fraction of the side) and zoom.

    A zoom > 1 is a mild random-resized crop. Borders are filled by reflection, so no
    black frame appears that the network could learn as a cue.
    """
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    angle = _uniform(g, n, -max_rotate, max_rotate) * (math.pi / 180)
    zoom = _uniform(g, n, *scale)
    tx = _uniform(g, n, -2 * max_translate, 2 * max_translate)  # grid units span 2
    ty = _uniform(g, n, -2 * max_translate, 2 * max_translate)
    sx = torch.ones(n)
    if flip:
        sx = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * sx, -sin, tx], 1),
                         torch.stack([sin * sx, cos, ty], 1)], 1).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False).clamp_(0.0, 1.0)


def weak_view(x, g):
    """FixMatch weak view: flip, ±10° rotation, ±6 % translation, 0.9-1.1 zoom."""
    return random_affine(_as_float(x), g)


def _apply_intensity(img_u8, op: str, mag: float):
    """One op on one (1, H, W) uint8 image; ``mag`` in [0, 1] sets its strength."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    sign = 1.0 if mag >= 0.5 else -1.0
    m = abs(mag - 0.5) * 2  # 0..1
    if op == "contrast":
        return TF.adjust_contrast(img_u8, 1.0 + sign * 0.6 * m)
    if op == "brightness":
        return TF.adjust_brightness(img_u8, 1.0 + sign * 0.4 * m)
    if op == "gamma":
        return TF.adjust_gamma(img_u8, float(2.0 ** (sign * 0.8 * m)))
    if op == "autocontrast":
        return TF.autocontrast(img_u8)
    if op == "equalize":
        return TF.equalize(img_u8)
    if op == "sharpness":
        return TF.adjust_sharpness(img_u8, 1.0 + sign * 0.9 * m)
    if op == "blur":
        sigma = 0.1 + 1.2 * m
        out = TF.gaussian_blur(img_u8.float(), [5, 5], [sigma, sigma])
        return out.round().clamp(0, 255).to(torch.uint8)
    if op == "posterize":
        return TF.posterize(img_u8, int(round(8 - 4 * m)))  # 8..4 bits
    raise ValueError(f"unknown intensity op {op!r}")


def intensity_ops(x, g, n_ops: int = 2):
    """``n_ops`` random greyscale intensity ops per sample (float [0,1] in and out)."""
    import torch

    n = x.shape[0]
    u8 = (x * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()
    choice = torch.randint(0, len(INTENSITY_OPS), (n, n_ops), generator=g)
    mags = torch.rand(n, n_ops, generator=g)
    out = []
    for i in range(n):
        img = u8[i]
        for j in range(n_ops):
            img = _apply_intensity(img, INTENSITY_OPS[int(choice[i, j])], float(mags[i, j]))
        out.append(img)
    return (torch.stack(out).float() / 255.0).to(x.device)


def cutout(x, g, *, max_fraction: float = 0.4, p: float = 1.0):
    """Random erasing: a square of side up to ``max_fraction`` of the image, filled with
    the image mean (grey, not black, so the filled value itself carries no class cue)."""
    import torch

    n, _, h, w = x.shape
    x = x.clone()
    apply = torch.rand(n, generator=g) < p
    side = (torch.rand(n, generator=g) * max_fraction * min(h, w)).long().clamp(min=1)
    cy = torch.randint(0, h, (n,), generator=g)
    cx = torch.randint(0, w, (n,), generator=g)
    for i in range(n):
        if apply[i]:
            s = int(side[i])
            y0, x0 = max(0, int(cy[i]) - s // 2), max(0, int(cx[i]) - s // 2)
            x[i, :, y0:y0 + s, x0:x0 + s] = x[i].mean()
    return x


def strong_view(x, g, n_ops: int = 2):
    """FixMatch strong view: weak geometry + ``n_ops`` intensity ops + cutout."""
    return cutout(intensity_ops(weak_view(x, g), g, n_ops), g)


def simclr_view(x, g):
    """SimCLR view for greyscale: aggressive crop (zoom 1-1.8), flip, ±15° rotation,
    two intensity ops (contrast/gamma/blur/...) and a random cutout half of the time."""
    x = random_affine(_as_float(x), g, max_rotate=15.0, max_translate=0.1, scale=(1.0, 1.8))
    return cutout(intensity_ops(x, g, 2), g, max_fraction=0.3, p=0.5)


def _as_float(x):
    import torch

    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


def to_model_input(x):
    """(N, 1, H, W) float [0,1] → 3 channels, ImageNet mean/std (as the embed stage)."""
    import torch

    from .backbone import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std
