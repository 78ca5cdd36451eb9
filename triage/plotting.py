"""Tiny Pillow line charts (matplotlib is not a dependency) for reviewer reports."""

from __future__ import annotations

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]


def line_chart(series: dict[str, tuple[list[float], list[float]]], *, title: str, x_label: str,
               y_label: str, size: tuple[int, int] = (560, 440),
               dashed: set[str] | None = None, diagonal: bool = False,
               colour_of: dict[str, int] | None = None,
               points: dict[str, tuple[float, float]] | None = None) -> Image.Image:
    """Plot named (x, y) series on [0, 1]² axes, one legend row each (the name is the
    legend text). ``dashed`` names are drawn dashed, in the legend too; ``colour_of`` maps
    a name to a palette index (one colour per model, base dashed); ``points`` marks one
    point of a series (its operating point) with a ring."""
    w, h = size
    left, right, top = 56, 16, 34
    img = Image.new("RGB", (w, h + 16 * len(series)), "white")
    d = ImageDraw.Draw(img)
    pw, ph = w - left - right, h - top - 60

    def px(x: float, y: float) -> tuple[float, float]:
        return left + x * pw, top + (1 - y) * ph

    d.text((left, 8), title, fill="black")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, _ = px(t, 0)
        _, y = px(0, t)
        d.line([x, top + ph, x, top + ph + 4], fill="black")
        d.text((x - 10, top + ph + 6), f"{t:.2f}", fill="black")
        d.line([left - 4, y, left, y], fill="black")
        d.text((left - 36, y - 6), f"{t:.2f}", fill="black")
        d.line([left + 1, y, left + pw - 1, y], fill=(235, 235, 235))
    d.text((left + pw // 2 - 40, top + ph + 22), x_label, fill="black")
    d.text((4, top - 18), y_label, fill="black")
    if diagonal:
        d.line([px(0, 0), px(1, 1)], fill=(190, 190, 190))
    dashed, colour_of, points = dashed or set(), colour_of or {}, points or {}
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[colour_of.get(name, i) % len(PALETTE)]
        pts = [px(min(max(x, 0), 1), min(max(y, 0), 1)) for x, y in zip(xs, ys)]
        if len(pts) >= 2:
            if name in dashed:
                for j in range(0, len(pts) - 1, 2):
                    d.line([pts[j], pts[j + 1]], fill=colour, width=2)
            else:
                d.line(pts, fill=colour, width=2)
        if name in points:
            cx, cy = px(*points[name])
            d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], outline=colour, width=2)
        lx, ly = 8, top + ph + 40 + 16 * i
        if name in dashed:
            for x0 in (lx, lx + 8, lx + 16):
                d.line([x0, ly + 6, x0 + 4, ly + 6], fill=colour, width=3)
        else:
            d.line([lx, ly + 6, lx + 20, ly + 6], fill=colour, width=3)
        if name in points:
            d.ellipse([lx + 26, ly + 2, lx + 34, ly + 10], outline=colour, width=2)
        d.text((lx + 40, ly), name, fill="black")
    return img
