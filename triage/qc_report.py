"""Self-contained HTML data-quality dashboard of a QC run (``reports/qc.html``).

One file, no external resources: inline CSS, thumbnails as base64 PNG data URIs (at most
``THUMB_PX`` px a side), intensity histograms as inline SVG (those pieces are shared with
the other pages: :mod:`triage.pages`). Every text is escaped. The page holds patient
images: it is a DVC output, never committed to git.

Deterministic for the same inputs (no timestamps, stable order, Pillow's PNG encoder),
so ``dvc repro -f`` gives the same hash. The number of thumbnails and groups shown is
capped; the page says how many were left out, and data/qc/quarantine.csv stays the full
list.
"""

from __future__ import annotations

from html import escape

import pandas as pd

from .io import atomic_path
from .pages import (
    BASE_CSS,
    PAGE_END,
    grid,
    img_html,
    labelled_key,
    plural,
    split_histograms_svg,
    table,
    thumbnail_uri,
)
from .qc import SPLITS, QCReport

MAX_THUMBS = 120        # thumbnails per section (quarantined; kept with a note)
MAX_GROUPS = 30         # exact and near-duplicate groups shown (each)
MAX_GROUP_MEMBERS = 6   # members shown per group
SUMMARY_KEYS = ("n_images", "n_passed", "n_quarantined", "valid_rate", "n_noted",
                "exact_duplicate_groups", "leaked_test_images", "leaked_test_groups",
                "leaked_test_dropped", "near_duplicate_groups", "near_duplicate_images",
                "near_leaked_test_images", "near_label_conflict_groups",
                "patient_leaked_test_images", "patient_leaked_test_dropped")
GROUP_KINDS = (("exact", "Exact duplicate groups (same bytes)"),
               ("near", "Near-duplicate groups (perceptual hash)"))

# The one table of words for the page's raw keys: metrics keys (metrics/qc), quarantine
# reasons (reason/<code>, the codes of data/qc/quarantine.csv) and qc.* params. The page
# shows the words with the raw key beside them (pages.labelled_key).
LABELS = {
    "n_images": "Images in",
    "n_passed": "Passed QC",
    "n_quarantined": "Quarantined",
    "valid_rate": "Share that passed QC",
    "n_noted": "Kept with a note",
    "exact_duplicate_groups": "Groups of identical files",
    "leaked_test_images": "Test images identical to a training/pool image (leakage)",
    "leaked_test_groups": "Identical-file groups spanning test and training/pool",
    "leaked_test_dropped": "Leaked test images dropped",
    "near_duplicate_groups": "Near-duplicate groups",
    "near_duplicate_images": "Images in near-duplicate groups",
    "near_leaked_test_images": "Test images nearly identical to a training/pool image",
    "near_label_conflict_groups": "Near-duplicate groups with conflicting labels",
    "patient_leaked_test_images": "Test images of a patient with training/pool images",
    "patient_leaked_test_dropped": "Test images of such patients dropped",
    "patient_leaked_patients": "Patients with images on both sides",
    "patient_moved_to_labeled": "Test images moved to labelled to keep a patient on one side",
    "notes/patient_leakage_kept": "Test image of a patient with training/pool images, kept",
    "notes/mode_converted": "Colour mode converted to greyscale",
    "notes/format_mismatch": "File format does not match its extension",
    "notes/size_outlier": "Size far from the median",
    "notes/near_duplicate": "Near-duplicate of another image",
    "notes/near_leakage": "Possible leakage: near-duplicate across test and training/pool",
    "notes/near_label_conflict": "In a near-duplicate group with conflicting labels",
    "notes/leakage_kept": "Test copy of a training/pool image, kept",
    "size/distinct": "Distinct image sizes",
    "size/min_side": "Smallest side (px)",
    "size/max_side": "Largest side (px)",
    "size/median_width": "Median width (px)",
    "size/median_height": "Median height (px)",
    "size/outliers": "Size outliers",
    "reason/zero_byte": "Empty file (0 bytes)",
    "reason/unreadable": "File could not be read",
    "reason/non_utf8_filename": "File name is not valid UTF-8",
    "reason/link_outside_root": "Symlink leading outside the data folder",
    "reason/not_an_image": "Not an image file",
    "reason/decompression_bomb": "Too many pixels to open safely",
    "reason/too_large": "More pixels than allowed",
    "reason/decode_error": "Corrupt or truncated image",
    "reason/unsupported_mode": "Unsupported colour mode",
    "reason/too_small": "Too small",
    "reason/aspect_outlier": "Too elongated (aspect ratio)",
    "reason/blank": "Blank (near-constant pixels)",
    "reason/size_outlier": "Size far from the median",
    "reason/label_conflict": "Same image filed under several labels",
    "reason/leakage": "Test copy of a training/pool image (leakage)",
    "reason/duplicate": "Duplicate of another image",
    "reason/near_duplicate": "Near-duplicate of another image",
    "reason/near_leakage": "Test near-duplicate of a training/pool image",
    "reason/patient_leakage": "Test image of a patient with training/pool images",
    "reason/dicom_compressed": "DICOM with a compression that cannot be decoded here",
    "reason/dicom_unreadable": "DICOM file that cannot be read",
    "reason/burned_in": "DICOM with text burned into the pixels (possible identifiers)",
    "reason/dicom_no_pixels": "DICOM without an image",
    "reason/multi_frame": "Multi-frame DICOM (deid.multi_frame: quarantine)",
    "reason/dicom_not_supported": "DICOM outside the deid stage",
    "reason/hash_mismatch": "File differs from its archive manifest entry (sha256 or size)",
    "reason/missing_file": "No file at the archive manifest's path",
    "qc.min_side": "Minimum image side (px)",
    "qc.max_pixels": "Maximum pixels per image",
    "qc.min_std": "Minimum pixel standard deviation (0-255)",
    "qc.max_aspect": "Maximum aspect ratio",
    "qc.leakage_policy": "Test images identical to training/pool",
    "qc.convert_modes": "Convert other colour modes to greyscale",
    "qc.size_outlier_factor": "Size outlier factor (vs the median)",
    "qc.size_outlier_policy": "Size outliers",
    "qc.near_dup_hamming": "Near-duplicate pHash distance (bits)",
    "qc.near_dup_policy": "Near-duplicates",
    "qc.workers": "Decode processes",
}


def label(key: str) -> str:
    """Words for a raw key (:data:`LABELS`); an unknown key reads as its last part in words."""
    if key in LABELS:
        return LABELS[key]
    if key.startswith("input_modes/"):
        return f"Decoded colour mode {key.split('/', 1)[1]}"
    words = key.rsplit("/", 1)[-1].rsplit(".", 1)[-1].replace("_", " ")
    return words[:1].upper() + words[1:]


def key_cell(key: str, shown: str | None = None):
    """A table cell: the words for ``key`` and the raw key (``shown``, default ``key``)."""
    return labelled_key(label(key), shown or key)


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
        return img_html(uri, alt=str(row["path"]))


def _status(row) -> str:
    if pd.notna(row["reason"]):
        why = str(row["reason"])
        return (f'<span class="reason" title="{escape(why)}">{escape(label("reason/" + why))}</span> '
                f'<code class="key">{escape(why)}</code>')
    return '<span class="kept">kept</span>'


def _card(th: _Thumbs, idx: int, extra: str = "") -> str:
    row = th.frame.loc[idx]
    cls = row["label"] if pd.notna(row["label"]) else "-"
    return (f'<div class="card">{th.html(idx)}{_status(row)} {extra}<br>'
            f'{escape(str(row["split"]))} / {escape(str(cls))}<br>'
            f'<span class="muted path">{escape(str(row["path"]))}</span></div>')


def _round_robin(frame: pd.DataFrame, key: str) -> list[int]:
    """Indices ordered so that every value of ``key`` gets shown before any gets many."""
    buckets = [list(g.sort_values("path").index) for _, g in frame.groupby(key, sort=True)]
    out = []
    for k in range(max((len(b) for b in buckets), default=0)):
        out += [b[k] for b in buckets if k < len(b)]
    return out


# --------------------------------------------------------------------------- page sections
# Each returns the page's parts (joined with newlines by render_html), in page order.
def _head(title: str) -> list[str]:
    return [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{BASE_CSS}</style></head><body><h1>{escape(title)}</h1>",
            '<p class="warn">This page embeds patient images. Do not commit or share it outside the '
            'data team. The full list of rejected images is <code>data/qc/quarantine.csv</code>.</p>']


def _summary(s: dict, params: dict) -> list[str]:
    h = ['<h2 id="summary">Summary</h2>',
         table(["metric", "value"], [[key_cell(k), s[k]] for k in SUMMARY_KEYS if k in s]),
         f'<p class="muted">Invariant: {s["n_images"]} images in = {s["n_passed"]} passed + '
         f'{s["n_quarantined"]} quarantined.</p>']
    if params:
        h.append("<details><summary>QC parameters</summary>"
                 + table(["parameter", "value"], [[key_cell(f"qc.{k}"), v] for k, v in params.items()])
                 + "</details>")
    return h


def _splits(df: pd.DataFrame) -> list[str]:
    rows = []
    lab = df["label"].fillna("-")
    for split in SPLITS:
        for cls in sorted(lab[df["split"] == split].unique()):
            m = (df["split"] == split) & (lab == cls)
            q = int(df.loc[m, "reason"].notna().sum())
            rows.append([split, cls, int(m.sum()), int(m.sum()) - q, q])
    return ['<h2 id="splits">Images per split and class</h2>',
            table(["split", "class", "in", "passed", "quarantined"], rows, numeric_from=2)]


def _reasons_and_notes(df: pd.DataFrame, s: dict) -> list[str]:
    rc = df["reason"].dropna().value_counts().sort_index()
    nk = [[key_cell(k), v] for k, v in s.items() if k.startswith("notes/") and v]
    nk += [[key_cell(k), v] for k, v in s.items() if k.startswith("input_modes/")]
    h = ['<h2 id="reasons">Quarantine reasons</h2>',
         table(["reason", "images"], [[key_cell(f"reason/{k}", k), int(v)] for k, v in rc.items()])
         if len(rc) else "<p>Nothing quarantined.</p>",
         '<h2 id="notes">Notes on kept images</h2>',
         table(["note", "images"], nk) if nk else "<p>No notes.</p>"]
    size_keys = [k for k in s if k.startswith("size/")]
    if size_keys:
        h.append(table(["image size", "value"], [[key_cell(k), s[k]] for k in size_keys]))
    return h


def _flagged(df: pd.DataFrame, th: _Thumbs, max_thumbs: int) -> list[str]:
    """Quarantined images (round robin over reasons), then kept images with a note."""
    quar = df[df["reason"].notna()]
    order = _round_robin(quar, "reason")
    shown = order[:max_thumbs]
    h = [f'<h2 id="quarantined">Quarantined images ({len(quar)})</h2>',
         grid(_card(th, i, f'<br><span class="path">{escape(str(df.at[i, "detail"]))}</span>') for i in shown)]
    if len(order) > len(shown):
        h.append(f'<p class="muted">{plural(len(order) - len(shown), "more quarantined image")} not shown '
                 f'(see data/qc/quarantine.csv).</p>')
    noted = df[df["reason"].isna() & df["qc_note"].notna()]
    kinds = noted["qc_note"].str.split(";").str[0].str.split(":").str[0].str.slice(0, 24)
    order = _round_robin(noted.assign(_kind=kinds), "_kind")
    shown = order[:max_thumbs]
    h += [f'<h2 id="noted">Kept with a note ({len(noted)})</h2>',
          grid(_card(th, i, f'<br><span class="path">{escape(str(df.at[i, "qc_note"]))}</span>')
               for i in shown)]
    if len(order) > len(shown):
        h.append(f'<p class="muted">{plural(len(order) - len(shown), "more noted image")} not shown '
                 f'(the qc_note column of data/qc/manifest_clean.parquet has them all).</p>')
    return h


def _group(report: QCReport, th: _Thumbs, kind: str, g: list[int], cross: bool) -> str:
    """One duplicate group: its size, then at most MAX_GROUP_MEMBERS cards."""
    cards = []
    for i in g[:MAX_GROUP_MEMBERS]:
        extra = f'd={report.groups.get("near_dist", {}).get(i, "?")}' if kind == "near" else ""
        cards.append(_card(th, i, extra))
    more = len(g) - MAX_GROUP_MEMBERS
    tail = f'<div class="muted">+{more} more</div>' if more > 0 else ""
    spans = " (test and training/pool)" if cross else ""
    return (f'<div class="muted">{len(g)} images{escape(spans)}</div>'
            f'<div class="group">{"".join(cards)}{tail}</div>')


def _duplicate_groups(report: QCReport, th: _Thumbs, kind: str, heading: str,
                      max_groups: int) -> list[str]:
    """The groups of one kind, those spanning test and training/pool (leakage) first."""
    df, params = report.frame, report.params
    groups = report.groups.get(kind, [])
    h = [f'<h2 id="{kind}">{escape(heading)} ({len(groups)})</h2>']
    if kind == "near":
        h.append(f'<p class="muted">pHash Hamming distance to the first image &le; '
                 f'{escape(str(params.get("near_dup_hamming", "")))} (qc.near_dup_hamming), '
                 f'linked transitively; policy qc.near_dup_policy='
                 f'{escape(str(params.get("near_dup_policy", "")))}.</p>')
    spans = [g for g in groups if df.loc[g, "split"].eq("test").any() and df.loc[g, "split"].ne("test").any()]
    rest = [g for g in groups if g not in spans]
    h += [_group(report, th, kind, g, g in spans) for g in (spans + rest)[:max_groups]]
    if len(groups) > max_groups:
        h.append(f'<p class="muted">{plural(len(groups) - max_groups, "more group")} not shown.</p>')
    return h


def _intensity(report: QCReport) -> list[str]:
    s = report.stats
    h = ['<h2 id="intensity">Intensity</h2>',
         "<p>Mean per-image histogram of greyscale pixel values (0-255) of the passed "
         "images, per split:</p>",
         split_histograms_svg(report.hist)]
    irows = []
    for k, v in s.items():
        if k.startswith("intensity/") and k.endswith("/mean"):
            _, split, cls, _ = k.split("/")
            base = f"intensity/{split}/{cls}"
            irows.append([split, cls, s[f"{base}/n"], v, s[f"{base}/std"]])
    if irows:
        h.append(table(["split", "class", "images", "mean of means", "mean of stds"], irows,
                       numeric_from=2))
    return h


def _shift(s: dict) -> list[str]:
    srows = []
    for k, v in s.items():
        if k.startswith("shift/") and "/ks_" in k:
            _, pair, stat = k.split("/")
            col = stat[3:]
            srows.append([pair.replace("_vs_", " vs "), f"per-image {col}", v,
                          s.get(f"shift/{pair}/p_{col}", "")])
    return ['<h2 id="shift">Distribution shift between splits</h2>',
            table(["splits", "statistic of", "KS D", "p-value"], srows, numeric_from=2)
            if srows else "<p>Too few images per split.</p>"]


def render_html(report: QCReport, *, max_thumbs: int = MAX_THUMBS, max_groups: int = MAX_GROUPS,
                title: str = "QC data-quality report") -> str:
    df, s = report.frame, report.stats
    th = _Thumbs(df, 2 * max_thumbs + 2 * max_groups * MAX_GROUP_MEMBERS)
    h = _head(title) + _summary(s, report.params) + _splits(df) + _reasons_and_notes(df, s)
    h += _flagged(df, th, max_thumbs)
    for kind, heading in GROUP_KINDS:
        h += _duplicate_groups(report, th, kind, heading, max_groups)
    h += _intensity(report) + _shift(s)
    h.append(f'<p class="muted">{th.shown} thumbnails embedded (at most {max_thumbs} per section, '
             f'{max_groups} groups of {MAX_GROUP_MEMBERS}).</p>')
    h.append(PAGE_END + "\n")
    return "\n".join(h)


def write_html(report: QCReport, path, **kwargs) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(render_html(report, **kwargs), encoding="utf-8")
