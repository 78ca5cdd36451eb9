"""Self-contained HTML data-quality dashboard of a QC run (``reports/qc.html``).

One file, no external resources: inline CSS, thumbnails as base64 PNG data URIs (at most
``THUMB_PX`` px a side), intensity histograms as inline SVG. Every text is escaped. The
page holds patient images: it is a DVC output, never committed to git.

Deterministic for the same inputs (no timestamps, stable order, Pillow's PNG encoder),
so ``dvc repro -f`` gives the same hash. The number of thumbnails and groups shown is
capped; the page says how many were left out, and data/qc/quarantine.csv stays the full
list.
"""

from __future__ import annotations

import base64
import io
from html import escape

import numpy as np
import pandas as pd
from PIL import Image

from .images import load_grey
from .io import atomic_path
from .qc import HIST_BINS, SPLITS, QCReport

THUMB_PX = 96
MAX_THUMBS = 120        # thumbnails per section (quarantined; kept with a note)
MAX_GROUPS = 30         # exact and near-duplicate groups shown (each)
MAX_GROUP_MEMBERS = 6   # members shown per group
SPLIT_COLOURS = {"labeled": "#1f77b4", "unlabeled": "#7f7f7f", "test": "#d62728"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:.9em}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:8px 12px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{width:200px;border:1px solid #ddd;padding:6px;font-size:.75em;word-break:break-all}
.card img,.noimg{display:block;margin:0 auto 4px}
.noimg{width:96px;height:96px;background:#eee;color:#888;font-size:.8em;display:flex;align-items:center;justify-content:center}
.reason{font-weight:bold;color:#a00}.kept{font-weight:bold;color:#070}
.group{display:flex;gap:8px;border:1px solid #ddd;padding:6px;margin:6px 0;overflow-x:auto}
.group .card{width:150px;border:none}
.muted{color:#666;font-size:.85em}
"""


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


class _Thumbs:
    """Thumbnails with a global budget; decodes only images QC could fully decode."""

    def __init__(self, frame: pd.DataFrame, budget: int):
        self.frame, self.budget, self.shown, self.cache = frame, budget, 0, {}

    def html(self, idx: int) -> str:
        row = self.frame.loc[idx]
        if idx in self.cache:
            uri = self.cache[idx]
        elif pd.isna(row["phash"]):  # never decode what QC could not (bombs, corrupt files)
            return '<div class="noimg">no preview</div>'
        elif self.shown >= self.budget:
            return '<div class="noimg">not shown</div>'
        else:
            uri = self.cache[idx] = thumbnail_uri(str(row["path"]))
            self.shown += 1
        if uri is None:
            return '<div class="noimg">no preview</div>'
        return f'<img src="{uri}" alt="{escape(str(row["path"]))}">'


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


def _table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for k, v in enumerate(r):
            cls = ' class="n"' if k >= numeric_from else ""
            cells.append(f"<td{cls}>{_num(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _status(row) -> str:
    if pd.notna(row["reason"]):
        return f'<span class="reason">{escape(str(row["reason"]))}</span>'
    return '<span class="kept">kept</span>'


def _card(th: _Thumbs, idx: int, extra: str = "") -> str:
    row = th.frame.loc[idx]
    label = row["label"] if pd.notna(row["label"]) else "-"
    return (f'<div class="card">{th.html(idx)}{_status(row)} {extra}<br>'
            f'{escape(str(row["split"]))} / {escape(str(label))}<br>'
            f'<span class="muted">{escape(str(row["path"]))}</span></div>')


def histogram_svg(hists: dict, width: int = 560, height: int = 200) -> str:
    """Per-split mean intensity histograms as one inline SVG line chart."""
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
        pts = " ".join(f"{pad_l + iw * (b + 0.5) / HIST_BINS:.1f},{pad_t + ih * (1 - v / top):.1f}"
                       for b, v in enumerate(h))
        colour = SPLIT_COLOURS.get(split, "#000")
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}">'
                     f'<title>{escape(split)}</title></polyline>')
        parts.append(f'<text x="{width - 90}" y="{pad_t + 16 + 14 * n}" font-size="11" '
                     f'fill="{colour}">{escape(split)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _round_robin(frame: pd.DataFrame, key: str) -> list[int]:
    """Indices ordered so that every value of ``key`` gets shown before any gets many."""
    buckets = [list(g.sort_values("path").index) for _, g in frame.groupby(key, sort=True)]
    out = []
    for k in range(max((len(b) for b in buckets), default=0)):
        out += [b[k] for b in buckets if k < len(b)]
    return out


def render_html(report: QCReport, *, max_thumbs: int = MAX_THUMBS, max_groups: int = MAX_GROUPS,
                title: str = "QC data-quality report") -> str:
    df, s = report.frame, report.stats
    th = _Thumbs(df, 2 * max_thumbs + 2 * max_groups * MAX_GROUP_MEMBERS)
    h = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
         f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>",
         '<p class="warn">This page embeds patient images. Do not commit or share it outside the '
         'data team. The full list of rejected images is <code>data/qc/quarantine.csv</code>.</p>']

    # Summary
    h.append('<h2 id="summary">Summary</h2>')
    keys = ["n_images", "n_passed", "n_quarantined", "valid_rate", "n_noted",
            "exact_duplicate_groups", "leaked_test_images", "leaked_test_groups", "leaked_test_dropped",
            "near_duplicate_groups", "near_duplicate_images", "near_leaked_test_images",
            "near_label_conflict_groups"]
    h.append(_table(["metric", "value"], [[k, s[k]] for k in keys if k in s]))
    h.append(f'<p class="muted">Invariant: {s["n_images"]} images in = {s["n_passed"]} passed + '
             f'{s["n_quarantined"]} quarantined.</p>')
    params = report.params
    if params:
        h.append("<details><summary>QC parameters</summary>"
                 + _table(["qc.*", "value"], [[k, v] for k, v in params.items()]) + "</details>")

    # Per split / class
    h.append('<h2 id="splits">Images per split and class</h2>')
    rows = []
    lab = df["label"].fillna("-")
    for split in SPLITS:
        for cls in sorted(lab[df["split"] == split].unique()):
            m = (df["split"] == split) & (lab == cls)
            q = int(df.loc[m, "reason"].notna().sum())
            rows.append([split, cls, int(m.sum()), int(m.sum()) - q, q])
    h.append(_table(["split", "class", "in", "passed", "quarantined"], rows, numeric_from=2))

    # Reasons and notes
    h.append('<h2 id="reasons">Quarantine reasons</h2>')
    rc = df["reason"].dropna().value_counts().sort_index()
    h.append(_table(["reason", "images"], [[k, int(v)] for k, v in rc.items()])
             if len(rc) else "<p>Nothing quarantined.</p>")
    h.append('<h2 id="notes">Notes on kept images</h2>')
    nk = [[k.split("/", 1)[1], v] for k, v in s.items() if k.startswith("notes/") and v]
    nk += [[f"decoded mode {k.split('/', 1)[1]}", v] for k, v in s.items() if k.startswith("input_modes/")]
    h.append(_table(["note", "images"], nk) if nk else "<p>No notes.</p>")
    size_keys = [k for k in s if k.startswith("size/")]
    if size_keys:
        h.append(_table(["image size", "value"], [[k.split("/", 1)[1], s[k]] for k in size_keys]))

    # Flagged images
    quar = df[df["reason"].notna()]
    h.append(f'<h2 id="quarantined">Quarantined images ({len(quar)})</h2>')
    order = _round_robin(quar, "reason")
    shown = order[:max_thumbs]
    h.append('<div class="grid">' + "".join(
        _card(th, i, f'<br>{escape(str(df.at[i, "detail"]))}') for i in shown) + "</div>")
    if len(order) > len(shown):
        h.append(f'<p class="muted">{len(order) - len(shown)} more quarantined images not shown '
                 f'(see data/qc/quarantine.csv).</p>')
    noted = df[df["reason"].isna() & df["qc_note"].notna()]
    h.append(f'<h2 id="noted">Kept with a note ({len(noted)})</h2>')
    kinds = noted["qc_note"].str.split(";").str[0].str.split(":").str[0].str.slice(0, 24)
    order = _round_robin(noted.assign(_kind=kinds), "_kind")
    shown_n = order[:max_thumbs]
    h.append('<div class="grid">' + "".join(
        _card(th, i, f'<br>{escape(str(df.at[i, "qc_note"]))}') for i in shown_n) + "</div>")
    if len(order) > len(shown_n):
        h.append(f'<p class="muted">{len(order) - len(shown_n)} more noted images not shown '
                 f'(the qc_note column of data/qc/manifest_clean.parquet has them all).</p>')

    # Duplicate groups
    for kind, heading in (("exact", "Exact duplicate groups (same bytes)"),
                          ("near", "Near-duplicate groups (perceptual hash)")):
        groups = report.groups.get(kind, [])
        h.append(f'<h2 id="{kind}">{escape(heading)} ({len(groups)})</h2>')
        if kind == "near":
            h.append(f'<p class="muted">pHash Hamming distance to the first image &le; '
                     f'{escape(str(params.get("near_dup_hamming", "")))} (qc.near_dup_hamming), '
                     f'linked transitively; policy qc.near_dup_policy='
                     f'{escape(str(params.get("near_dup_policy", "")))}.</p>')
        # leakage first: the groups that span test and training/pool
        spans = [g for g in groups if df.loc[g, "split"].eq("test").any() and df.loc[g, "split"].ne("test").any()]
        rest = [g for g in groups if g not in spans]
        for g in (spans + rest)[:max_groups]:
            cross = " (test and training/pool)" if g in spans else ""
            cards = []
            for i in g[:MAX_GROUP_MEMBERS]:
                extra = ""
                if kind == "near":
                    extra = f'd={report.groups.get("near_dist", {}).get(i, "?")}'
                cards.append(_card(th, i, extra))
            more = len(g) - MAX_GROUP_MEMBERS
            tail = f'<div class="muted">+{more} more</div>' if more > 0 else ""
            h.append(f'<div class="muted">{len(g)} images{escape(cross)}</div>'
                     f'<div class="group">{"".join(cards)}{tail}</div>')
        if len(groups) > max_groups:
            h.append(f'<p class="muted">{len(groups) - max_groups} more groups not shown.</p>')

    # Intensity
    h.append('<h2 id="intensity">Intensity</h2>')
    h.append("<p>Mean per-image histogram of greyscale pixel values (0-255) of the passed "
             "images, per split:</p>")
    h.append(histogram_svg(report.hist))
    irows = []
    for k, v in s.items():
        if k.startswith("intensity/") and k.endswith("/mean"):
            _, split, cls, _ = k.split("/")
            base = f"intensity/{split}/{cls}"
            irows.append([split, cls, s[f"{base}/n"], v, s[f"{base}/std"]])
    if irows:
        h.append(_table(["split", "class", "images", "mean of means", "mean of stds"], irows,
                        numeric_from=2))
    srows = []
    for k, v in s.items():
        if k.startswith("shift/") and "/ks_" in k:
            _, pair, stat = k.split("/")
            col = stat[3:]
            srows.append([pair.replace("_vs_", " vs "), f"per-image {col}", v,
                          s.get(f"shift/{pair}/p_{col}", "")])
    h.append('<h2 id="shift">Distribution shift between splits</h2>')
    h.append(_table(["splits", "statistic of", "KS D", "p-value"], srows, numeric_from=2)
             if srows else "<p>Too few images per split.</p>")
    h.append(f'<p class="muted">{th.shown} thumbnails embedded (at most {max_thumbs} per section, '
             f'{max_groups} groups of {MAX_GROUP_MEMBERS}).</p>')
    h.append("</body></html>\n")
    return "\n".join(h)


def write_html(report: QCReport, path, **kwargs) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(render_html(report, **kwargs), encoding="utf-8")
