"""The QC HTML dashboard: self-contained, escaped, complete, capped, deterministic; and the
stage writes it (with counts, not paths, in its log). Parsed with the stdlib HTML parser;
rendered in headless Chromium when /usr/bin/chromium exists."""
import base64
import io
import os
import re
import subprocess
import sys
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import imagefactory as F
import pytest
import yaml
from browser import dump_dom, needs_chromium
from helpers import QC
from imagefactory import copy_file, write_smooth, write_upscaled_copy
from PIL import Image

from triage.io import write_parquet
from triage.prepare import build_manifest
from triage.qc import run_qc
from triage.qc_report import LABELS, SUMMARY_KEYS, render_html, write_html

ROOT = Path(__file__).resolve().parents[1]


class Page(HTMLParser):
    """Collects tags, attributes and visible text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.imgs, self.text, self.ids, self.links = [], [], [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if key in a and tag != "img":
                self.links.append(a[key])

    def handle_data(self, data):
        self.text.append(data)

    @property
    def body(self) -> str:
        return " ".join(self.text)


def parse(html: str) -> Page:
    p = Page()
    p.feed(html)
    p.close()
    return p


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    lay = F.make_layout(tmp / "raw", n_labeled={"cancer": 5, "normal": 5}, n_unlabeled=5,
                        n_test={"cancer": 3, "normal": 3})
    root, u = lay["root"], lay["root"] / "unlabeled"
    F.write_zero_byte(u / "zero.png")
    F.write_truncated_jpeg(u / "trunc.jpg", seed=9001)
    F.write_text_as_image(u / "notes.png")
    F.write_tiny(u / "tiny.png", seed=9002)
    F.write_png(u / "wide.png", size=(200, 40), seed=9003)
    F.write_blank(u / "blank.png")
    F.write_rgba_png(u / "rgba.png", seed=9004)
    F.write_png_named_jpg(u / "png.jpg", seed=9005)
    # a PNG named .jpg (so it is listed with a note) whose name is markup: must come out escaped
    F.write_png_named_jpg(u / "<b onclick=x>&'y.jpg", seed=9006)
    copy_file(lay["labeled"]["cancer"][0], u / "dup.png")
    copy_file(lay["labeled"]["normal"][0], root / "test" / "normal" / "leak.png")
    src = write_smooth(root / "labeled" / "cancer" / "smooth.png", seed=9007)
    write_upscaled_copy(src, u / "near.png")
    manifest, _ = build_manifest(root, "cancer", 0.25, 0)
    report = run_qc(manifest, **QC)
    return {"root": root, "report": report, "html": render_html(report)}


def test_every_quarantine_reason_and_section_is_on_the_page(messy):
    r, page = messy["report"], parse(messy["html"])
    reasons = set(r.quarantine["reason"])
    assert reasons >= {"zero_byte", "decode_error", "not_an_image", "too_small",
                       "aspect_outlier", "blank", "duplicate", "leakage"}
    for why in reasons:
        assert why in page.body
    assert {"summary", "splits", "reasons", "quarantined", "noted", "exact", "near",
            "intensity", "shift"} <= page.ids
    assert "svg" in page.tags and "polyline" in page.tags  # histograms drawn inline


def test_summary_counts_match_the_stats(messy):
    r, html = messy["report"], messy["html"]
    s = r.stats
    assert (f"Invariant: {s['n_images']} images in = {s['n_passed']} passed + "
            f"{s['n_quarantined']} quarantined") in html
    for why, n in r.quarantine["reason"].value_counts().items():
        assert (f'<td><span title="{why}">{LABELS["reason/" + why]}</span> <code class="key">{why}</code>'
                f'</td><td class="n">{n}</td>') in html
    assert f"Quarantined images ({len(r.quarantine)})" in html
    assert f"Exact duplicate groups (same bytes) ({s['exact_duplicate_groups']})" in html
    assert f"Near-duplicate groups (perceptual hash) ({s['near_duplicate_groups']})" in html
    assert s["near_duplicate_groups"] == 1


def test_page_is_self_contained_with_small_png_thumbnails(messy):
    page = parse(messy["html"])
    assert page.imgs, "no thumbnails"
    for img in page.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert im.format == "PNG" and max(im.size) <= 96
    assert not [link for link in page.links if not link.startswith(("#", "data:"))]
    assert "http://" not in messy["html"].replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in messy["html"]
    assert "<link" not in messy["html"] and "<script" not in messy["html"]


def test_text_is_escaped(messy):
    html = messy["html"]
    assert "&lt;b onclick=x&gt;&amp;&#x27;y.jpg" in html
    assert "<b onclick" not in html


def test_undecodable_images_get_no_preview_not_a_decode(messy):
    assert "no preview" in messy["html"]


def test_thumbnail_cap_says_how_many_were_left_out(messy):
    html = render_html(messy["report"], max_thumbs=2, max_groups=0)
    n = len(messy["report"].quarantine)
    assert f"{n - 2} more quarantined images not shown" in html
    assert "more groups not shown" in html
    page = parse(html)
    assert len(page.imgs) <= 4


def test_rendering_is_deterministic(messy):
    assert render_html(messy["report"]) == messy["html"]


def test_write_html_is_utf8_file(messy, tmp_path):
    out = tmp_path / "reports" / "qc.html"
    write_html(messy["report"], out)
    assert out.read_text(encoding="utf-8") == messy["html"]


@needs_chromium
def test_renders_in_headless_chromium(messy, tmp_path):
    out = tmp_path / "qc.html"
    write_html(messy["report"], out)
    dom = dump_dom(out, tmp_path / "profile")
    assert "QC data-quality report" in dom and "Quarantined images" in dom
    assert dom.count("data:image/png;base64,") == messy["html"].count("data:image/png;base64,")


def test_stage_writes_outputs_and_logs_counts_not_paths(tmp_path):
    """Run stages/qc.py in a scratch working directory: outputs, metrics, report; no paths in logs."""
    lay = F.make_layout(tmp_path / "data" / "raw", n_unlabeled=3, n_test={"cancer": 2, "normal": 2})
    F.write_truncated_jpeg(lay["root"] / "unlabeled" / "secret_patient_name.jpg", seed=9100)
    copy_file(lay["labeled"]["cancer"][0], lay["root"] / "test" / "cancer" / "leaky_patient.png")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        manifest, _ = build_manifest(Path("data/raw"), "cancer", 0.25, 0)
    finally:
        os.chdir(cwd)
    write_parquet(manifest, tmp_path / "data/prepared/manifest.parquet")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("DVCLIVE_TEST", None)  # the stage must log for real (as in test_pipeline.py)
    res = subprocess.run([sys.executable, str(ROOT / "stages" / "qc.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    log = res.stdout + res.stderr
    assert "patient" not in log and "data/raw" not in log and ".png" not in log
    assert "quarantined" in log
    quarantine = (tmp_path / "data/qc/quarantine.csv").read_text()
    assert "secret_patient_name.jpg,decode_error" in quarantine
    assert "leaky_patient.png,leakage" in quarantine
    assert (tmp_path / "data/qc/manifest_clean.parquet").is_file()
    html = (tmp_path / "reports/qc.html").read_text()
    assert "secret_patient_name.jpg" in html and "decode_error" in html
    import json
    metrics = json.loads((tmp_path / "metrics/qc/metrics.json").read_text())
    assert metrics["n_images"] == metrics["n_passed"] + metrics["n_quarantined"] == len(manifest)
    assert metrics["reason"]["leakage"] == 1 and "intensity" in metrics and "notes" in metrics


def test_words_wrap_between_words_and_only_paths_break_anywhere(messy):
    html = messy["html"]
    css = html[html.index("<style>"):html.index("</style>")]
    assert "break-all" not in css  # broke every word mid-word, in cards and their tables
    assert re.search(r"\.path[^{]*\{[^}]*overflow-wrap:anywhere", css)
    page = parse(html)
    # every image path on a card is in a .path element; the words around it are not
    paths = [p for p in messy["report"].frame["path"].astype(str) if escape(p) in html]
    assert paths
    for p in paths:
        assert re.search(r'class="[^"]*\bpath\b[^"]*">[^<]*' + re.escape(escape(p)), html), p
    assert "Quarantined images" in page.body


def test_metric_names_are_words_with_the_raw_key_beside_them(messy):
    r, html = messy["report"], messy["html"]
    s = r.stats
    shown = ([k for k in SUMMARY_KEYS if k in s] + [k for k in s if k.startswith(("notes/", "size/"))
                                                    and (s[k] or k.startswith("size/"))])
    for key in shown:
        assert key in LABELS, f"no words for {key} in qc_report.LABELS"
        assert f'<span title="{key}">{escape(LABELS[key])}</span> <code class="key">{key}</code>' in html
    # a raw key is never the only text of a cell
    assert "<td>size/min_side</td>" not in html and "<td>min_side</td>" not in html
    assert "<td>n_images</td>" not in html
    assert "Smallest side (px)" in html and "Images in" in html
    assert {f"reason/{c}" for c in r.quarantine["reason"]} <= set(LABELS)
    # the params table: words and qc.<key>
    for k in r.params:
        assert f'<code class="key">qc.{k}</code>' in html
    # cards name the reason in words, code beside it
    assert '<span class="reason" title="too_small">Too small</span> <code class="key">too_small</code>' in html


def test_every_documented_quarantine_reason_has_words():
    import triage.qc as qc
    doc = qc.__doc__.split("Order of the checks")[1].split("Usable oddities")[0]
    codes = set(re.findall(r"``([a-z_0-9]+)``", doc))
    assert {"zero_byte", "decode_error", "too_small", "leakage", "near_duplicate"} <= codes
    assert not {f"reason/{c}" for c in codes} - set(LABELS), "add the words to qc_report.LABELS"
