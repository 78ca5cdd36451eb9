"""Error analysis page and model card built from real (tiny) pipeline-shaped inputs."""
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import yaml
from browser import dump_dom, needs_chromium
from PIL import Image

from triage.report import error_table, nearest_labelled, render_errors_html, render_model_card


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.cards, self.h2 = [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "div" and "err" in (a.get("class") or "").split():
            self.cards.append(a.get("data-kind"))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


@pytest.fixture
def scene(tmp_path):
    """8 labelled, 6 test images with vectors; test predictions with known errors."""
    rng = np.random.default_rng(0)
    rows, X = [], []
    for i in range(14):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(p)
        split = "labeled" if i < 8 else "test"
        label = "cancer" if i % 2 else "normal"
        rows.append({"id": f"id{i:02d}", "split": split, "label": label, "path": str(p)})
        X.append(rng.normal(size=16))
    rows = pd.DataFrame(rows)
    X = np.asarray(X, np.float32)
    test = rows[rows["split"] == "test"]
    # truth: 8 normal, 9 cancer, 10 normal, 11 cancer, 12 normal, 13 cancer
    proba = {"id08": 0.9, "id09": 0.1, "id10": 0.2, "id11": 0.3, "id12": 0.7, "id13": 0.95}
    pred = pd.DataFrame({"id": test["id"], "label": test["label"],
                         "proba": test["id"].map(proba), "model": "semi_supervised"})
    clusters = pd.Series(np.arange(14) % 3, index=rows["id"])
    return rows, X, pred, clusters


def test_nearest_labelled_matches_brute_force():
    rng = np.random.default_rng(1)
    L, Q = rng.normal(size=(20, 5)), rng.normal(size=(4, 5))
    got = nearest_labelled(Q, L, k=3)
    for q, idx in zip(Q, got):
        sims = [float(q @ v / np.linalg.norm(q) / np.linalg.norm(v)) for v in L]
        assert list(idx) == sorted(range(20), key=lambda j: -sims[j])[:3]


def test_error_table_fn_first_and_complete(scene):
    rows, X, pred, clusters = scene
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.5)
    # FN: cancers below 0.5 = id09 (0.1), id11 (0.3); FP: normals >= 0.5 = id08 (0.9), id12 (0.7)
    assert err["id"].tolist() == ["id09", "id11", "id08", "id12"]
    assert err["kind"].tolist() == ["false negative"] * 2 + ["false positive"] * 2
    assert all(len(n) == 3 for n in err["neighbours"])
    labelled_paths = set(rows.loc[rows["split"] == "labeled", "path"])
    assert all(p in labelled_paths for n in err["neighbours"] for p, _ in n)
    assert err["cluster"].tolist() == [clusters[i] for i in err["id"]]


def test_errors_html_is_self_contained_and_ordered(scene):
    rows, X, pred, clusters = scene
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.5)
    html = render_errors_html({"semi_supervised": err}, {"semi_supervised": 0.5}, 6, "cancer")
    page = _Collect()
    page.feed(html)
    assert page.cards == ["false negative"] * 2 + ["false positive"] * 2
    assert page.imgs and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert len(page.imgs) == 4 * (1 + 3)  # each error + its 3 neighbours
    assert "2 false negatives, 2 false positives" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched when opened


def test_model_card_reports_metrics_with_cis(scene, repo_root):
    rows, X, pred, clusters = scene
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.5)
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    ev = {m: {"roc_auc": 0.81, "roc_auc_ci_low": 0.75, "roc_auc_ci_high": 0.86,
              "sensitivity": 0.93, "sensitivity_ci_low": 0.88, "sensitivity_ci_high": 0.96,
              "fn": 4, "threshold": 0.12} for m in ("baseline", "semi_supervised")}
    ev["delta"] = {"roc_auc": 0.0, "roc_auc_ci_low": -0.01, "roc_auc_ci_high": 0.01}
    ev["n_test"] = 6
    card = render_model_card(params, {"evaluate": ev, "qc": {"n_images": 14}}, err)
    for section in ("## Intended use", "## Data and provenance", "## Method",
                    "## Performance on the held-out test set", "## Known failure modes",
                    "## Limitations", "## Ethical and RGPD/GDPR notes", "## Monitoring to do"):
        assert section in card
    assert "0.810 (0.750–0.860)" in card and "93.0 % (88.0–96.0)" in card
    assert "not a diagnosis" in card.lower() or "never a diagnosis" in card.lower()
    assert "2 missed cancer images" in card


@needs_chromium
def test_errors_page_renders_in_headless_chromium(scene, tmp_path):
    rows, X, pred, clusters = scene
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.5)
    page = tmp_path / "errors.html"
    page.write_text(render_errors_html({"semi_supervised": err}, {"semi_supervised": 0.5}, 6,
                                       "cancer"), encoding="utf-8")
    dom = dump_dom(page, tmp_path / "profile")
    assert "Error analysis on the held-out test set" in dom
    assert dom.count('data-kind="false negative"') == 2
    assert dom.index("false negative") < dom.index('data-kind="false positive"')
