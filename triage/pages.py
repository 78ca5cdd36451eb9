"""Pieces shared by the self-contained HTML pages: qc (``reports/qc.html``), errors
(``reports/errors.html``) and drift (``reports/drift.html``).

The base CSS, greyscale thumbnails as PNG data URIs, number formatting (table cells; a
score beside its threshold: :func:`fmt_scores`, :func:`score_vs_threshold`; counted nouns:
:func:`plural`), tables, grids of cards and two small inline SVG histogram charts. No
external resources, no timestamps: the same inputs give the same bytes (the pages are DVC
outputs with hashes in dvc.lock). Every text put on a page is escaped here or by the caller.

Only numpy, Pillow and the standard library: the page modules import this one, never
each other.
"""

from __future__ import annotations

import base64
import io
import math
from html import escape

import numpy as np
from PIL import Image

from .images import load_grey

THUMB_PX = 96
NO_PREVIEW = '<div class="noimg">no preview</div>'
PAGE_END = "</body></html>"
NUM_CLASS = ' class="n"'   # attribute of a right-aligned (numeric) table cell
SPLIT_COLOURS = {"labeled": "#1f77b4", "unlabeled": "#7f7f7f", "test": "#d62728"}
SAMPLE_COLOURS = ("#7f7f7f", "#d62728", "#1f77b4")   # first, second, third sample of a chart

# Text wraps between words everywhere; only long unbroken strings (paths, ids, raw keys:
# class "path" / code.key) may break anywhere, never ordinary words (no word-break:break-all).
BASE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:.9em}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:8px 12px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{width:200px;border:1px solid #ddd;padding:6px;font-size:.75em}
.path,code.key{overflow-wrap:anywhere}code.key{font-size:.8em;color:#666}
.card img,.noimg{display:block;margin:0 auto 4px}
.noimg{width:96px;height:96px;background:#eee;color:#888;font-size:.8em;display:flex;align-items:center;justify-content:center}
.reason{font-weight:bold;color:#a00}.kept{font-weight:bold;color:#070}
.group{display:flex;gap:8px;border:1px solid #ddd;padding:6px;margin:6px 0;overflow-x:auto}
.group .card{width:150px;border:none}
.muted{color:#666;font-size:.85em}
"""


# --------------------------------------------------------------------------- page frame
def page_head(title: str, css: str = BASE_CSS) -> str:
    """``<!doctype>`` up to the opened ``<body>``: the title (escaped) and inline CSS."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{css}</style></head><body>")


# --------------------------------------------------------------------------- thumbnails
def thumbnail_uri(path: str, px: int = THUMB_PX) -> str | None:
    """Greyscale thumbnail (as the pipeline sees the image) as a PNG data URI; None if unreadable."""
    try:
        im = load_grey(path)
        im.thumbnail((px, px), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    except Exception:  # noqa: BLE001 - a preview failing must not stop the report
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_html(uri: str | None, *, alt: str = "", width: int | None = None,
             missing: str = NO_PREVIEW) -> str:
    """``<img>`` of a data URI (``alt`` escaped), or ``missing`` when there is none."""
    if not uri:
        return missing
    size = f' width="{width}"' if width is not None else ""
    return f'<img src="{uri}"{size} alt="{escape(alt)}">'


def thumbnail_html(path: str, px: int = THUMB_PX, *, sized: bool = False,
                   missing: str = NO_PREVIEW) -> str:
    """The thumbnail of ``path`` as an ``<img>`` (``width=px`` when ``sized``), or ``missing``."""
    return img_html(thumbnail_uri(path, px), width=px if sized else None, missing=missing)


# --------------------------------------------------------------------------- words, scores
def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    """``"1 image"``, ``"2 images"``, ``"0 images"``: the count and the noun agreeing with it."""
    return f"{n} {singular if n == 1 else (plural_form or singular + 's')}"


SCORE_DIGITS = 3      # significant digits a score or threshold keeps at least
SCORE_FLOOR = 1e-6    # smaller positive scores read "< 0.000001" (no one compares further)


def _score_text(v: float, digits: int) -> tuple[str, float]:
    """(text, the value the text stands for) of one score with ``digits`` significant digits."""
    if not math.isfinite(v):
        return "n/a", v
    if 0 < abs(v) < SCORE_FLOOR:
        return f"< {SCORE_FLOOR:.6f}", 0.0
    decimals = digits if v == 0 else max(digits - 1 - math.floor(math.log10(abs(v))), 0)
    return f"{v:.{decimals}f}", round(v, decimals)


def fmt_scores(*values: float, digits: int = SCORE_DIGITS) -> list[str]:
    """Scores (probabilities) and thresholds as plain decimals that compare by eye.

    Each keeps at least ``digits`` significant digits, so a small score never reads 0.000
    beside a threshold of 0.0119 (it reads 0.0000312); digits are added to all of them
    until no two different values read the same or in the wrong order. Every page that
    sets a score beside its threshold formats both with this in one call.
    """
    vals = [float(v) for v in values]
    for extra in range(12):
        shown = [_score_text(v, digits + extra) for v in vals]
        if all(np.sign(a - b) == np.sign(ra - rb)
               for i, (a, (_, ra)) in enumerate(zip(vals, shown))
               for b, (_, rb) in zip(vals[i + 1:], shown[i + 1:])
               if math.isfinite(a - b) and not (abs(a) < SCORE_FLOOR and abs(b) < SCORE_FLOOR)):
            break
    return [t for t, _ in shown]


def fmt_score(v: float) -> str:
    """One score or threshold alone (see :func:`fmt_scores`)."""
    return fmt_scores(v)[0]


def score_vs_threshold(score: float, threshold: float, positive: str, negative: str) -> str:
    """``"score 0.0000312 < threshold 0.0119 → predicted normal"``: the score, the threshold
    with comparable digits, the comparison and the decision it gives (text, not escaped)."""
    s, t = fmt_scores(score, threshold)
    flagged = score >= threshold
    return f"score {s} {'≥' if flagged else '<'} threshold {t} → predicted {positive if flagged else negative}"


# --------------------------------------------------------------------------- tables, grids
class Html(str):
    """Text already HTML (escaped by whoever built it): a table cell puts it in as it is."""


def fmt(v) -> str:
    """A table cell's text: floats to 4 significant digits, :class:`Html` as is, anything
    else escaped."""
    if isinstance(v, Html):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


def labelled_key(label: str, key: str) -> Html:
    """A human label with its raw metric/parameter key beside it in small code text (and
    as the tooltip), so the reader sees words and can still find the key in the metrics."""
    return Html(f'<span title="{escape(key)}">{escape(label)}</span> <code class="key">{escape(key)}</code>')


def table(header: list[str], rows: list[list], numeric_from: int = 1, *,
          num_class: str = NUM_CLASS) -> str:
    """An HTML table; cells of column ``numeric_from`` on get ``num_class`` (right-aligned)."""
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f'<td{num_class if k >= numeric_from else ""}>{fmt(v)}</td>'
                                    for k, v in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def grid(cards) -> str:
    """Cards (HTML strings) in a wrapping flex grid."""
    return '<div class="grid">' + "".join(cards) + "</div>"


# --------------------------------------------------------------------------- SVG charts
def _points(values, x0: float, y0: float, w: float, h: float, top: float) -> str:
    """Polyline points of bar values at bin centres, 0 at the bottom and ``top`` at the top."""
    n = len(values)
    return " ".join(f"{x0 + w * (b + 0.5) / n:.1f},{y0 + h * (1 - v / top):.1f}"
                    for b, v in enumerate(values))


def split_histograms_svg(hists: dict, width: int = 560, height: int = 200,
                         colours: dict[str, str] = SPLIT_COLOURS) -> str:
    """Already binned intensity histograms over 0-255 (one per split, coloured by split
    name) as one inline SVG line chart with x ticks and the y range."""
    if not hists:
        return "<p>No decoded images.</p>"
    pad_l, pad_b, pad_t = 40, 30, 10
    top = max(float(np.max(h)) for h in hists.values()) or 1.0
    iw, ih = width - pad_l - 10, height - pad_b - pad_t
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="intensity histograms per split">',
             f'<rect x="{pad_l}" y="{pad_t}" width="{iw}" height="{ih}" fill="#fafafa" stroke="#ccc"/>']
    for k in range(0, 257, 64):
        x = pad_l + iw * k / 256
        parts.append(f'<text x="{x:.1f}" y="{height - 12}" font-size="10" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="10" text-anchor="end">{top:.2f}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + ih}" font-size="10" text-anchor="end">0</text>')
    for n, (split, h) in enumerate(hists.items()):
        colour = colours.get(split, "#000")
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{_points(h, pad_l, pad_t, iw, ih, top)}">'
                     f'<title>{escape(split)}</title></polyline>')
        parts.append(f'<text x="{width - 90}" y="{pad_t + 16 + 14 * n}" font-size="11" '
                     f'fill="{colour}">{escape(split)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def density_histograms_svg(series: dict[str, np.ndarray], lo: float, hi: float, title: str,
                           bins: int = 30, width: int = 340, height: int = 160,
                           colours=SAMPLE_COLOURS) -> str:
    """Raw samples binned on [lo, hi] (outliers clipped into the end bins, non-finite
    values dropped), as density lines on one small titled inline SVG."""
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    dens = {k: np.histogram(np.clip(v[np.isfinite(v)], edges[0], edges[-1]), edges)[0]
            / max(np.isfinite(v).sum(), 1) for k, v in series.items()}
    top = max((d.max() for d in dens.values()), default=1.0) or 1.0
    pl, pt, pb = 8, 18, 18
    iw, ih = width - 2 * pl, height - pt - pb
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><text x="{pl}" y="12" font-size="11">{escape(title)}</text>',
             f'<rect x="{pl}" y="{pt}" width="{iw}" height="{ih}" fill="#fafafa" stroke="#ccc"/>',
             f'<text x="{pl}" y="{height - 4}" font-size="9">{lo:.3g}</text>',
             f'<text x="{width - pl}" y="{height - 4}" font-size="9" text-anchor="end">{hi:.3g}</text>']
    for n, (name, d) in enumerate(dens.items()):
        c = colours[n % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" '
                     f'points="{_points(d, pl, pt, iw, ih, top)}"/>'
                     f'<text x="{width - pl - 4}" y="{pt + 12 + 12 * n}" font-size="10" '
                     f'text-anchor="end" fill="{c}">{escape(name)}</text>')
    return "".join(parts) + "</svg>"
