"""Error analysis page and model card built from real (tiny) pipeline-shaped inputs."""
import hashlib
import re
import socket
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import yaml
from browser import dump_dom, needs_chromium
from PIL import Image

from triage.pages import THUMB_PX, fmt_score, fmt_scores, plural, score_vs_threshold
from triage.report import (
    Groups,
    Versions,
    error_table,
    model_files,
    nearest_labelled,
    read_versions,
    render_errors_html,
    render_model_card,
)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.cards, self.h2, self.widths = [], [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
            self.widths.append(a.get("width"))
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
    assert "2 missed images of class **cancer**" in card


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


# --------------------------------------------------------------------------- readable cards
def _errors_page(scene, **kw):
    rows, X, pred, clusters = scene
    err = error_table(pred, rows, X, clusters, "cancer", threshold=kw.pop("threshold", 0.5))
    return err, render_errors_html({"semi_supervised": err}, {"semi_supervised": kw.pop("thr", 0.5)},
                                   6, "cancer", **kw)


def test_neighbour_thumbnails_are_as_large_as_the_error_thumbnail(scene):
    _, html = _errors_page(scene, negative="normal", groups=Groups(3, "kmeans"))
    page = _Collect()
    page.feed(html)
    assert len(page.widths) == 4 * (1 + 3)
    assert all(w is not None and int(w) >= 96 and int(w) == THUMB_PX for w in page.widths), page.widths
    # the card is wide enough for the three neighbours side by side
    width = int(re.search(r"\.card\.err\{width:(\d+)px\}", html).group(1))
    assert width >= 3 * THUMB_PX


def test_cluster_is_named_as_a_group_of_similar_images_and_explained(scene):
    _, html = _errors_page(scene, negative="normal", groups=Groups(3, "kmeans"))
    assert "cluster 0" not in html and "cluster 1" not in html and "cluster 2" not in html
    # id09 is in cluster 9 % 3 = 0
    assert "similar-image group 0 of 3" in html
    legend = html[html.index("How to read a card"):html.index("<h2")]
    assert "3 groups of visually similar images" in legend and "k-means" in legend
    assert "not a diagnosis or a class" in legend


def test_a_tiny_score_reads_comparably_to_its_threshold(scene):
    rows, X, pred, clusters = scene
    pred = pred.assign(proba=pred["id"].map({"id08": 0.9, "id09": 0.0000312, "id10": 0.001,
                                             "id11": 0.3, "id12": 0.7, "id13": 0.95}))
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.0119)
    html = render_errors_html({"semi_supervised": err}, {"semi_supervised": 0.0119}, 6, "cancer",
                              negative="normal")
    assert "score 0.0000312 &lt; threshold 0.0119 → predicted normal" in html
    assert "0.000 " not in html and "= 0.000<" not in html
    # false positives: a score above the threshold reads as such
    assert "score 0.900 ≥ threshold 0.0119 → predicted cancer" in html
    assert "threshold 0.0119: 1 false negative, 2 false positives" in html


def test_fmt_scores_keeps_significant_digits_and_never_reads_two_values_as_equal_or_inverted():
    assert fmt_scores(0.0000312, 0.0119) == ["0.0000312", "0.0119"]
    assert fmt_scores(0.9, 0.05792) == ["0.900", "0.0579"]
    a, b = fmt_scores(0.057914, 0.05792)
    assert a != b and float(a) < float(b)
    assert fmt_scores(0.0579, 0.0579) == ["0.0579", "0.0579"]
    a, b = fmt_scores(0.0999996, 0.1000001)
    assert float(a) < float(b)
    assert fmt_score(1e-9) == "< 0.000001" and fmt_score(float("nan")) == "n/a"
    assert fmt_score(0.0) == "0.000" and fmt_score(1.0) == "1.00"
    assert score_vs_threshold(0.0119, 0.0119, "cancer", "normal") == \
        "score 0.0119 ≥ threshold 0.0119 → predicted cancer"
    assert score_vs_threshold(1e-9, 0.0119, "yes", "no") == "score < 0.000001 < threshold 0.0119 → predicted no"


def test_plural_agrees_with_the_count():
    assert plural(1, "image") == "1 image" and plural(0, "image") == "0 images"
    assert plural(2, "false negative") == "2 false negatives"
    assert plural(3, "analysis", "analyses") == "3 analyses"


# --------------------------------------------------------------------------- model card
def _card_metrics(sens: float, fn: int, tp: int, hi: float = 0.97) -> dict:
    ev = {m: {"roc_auc": 0.81, "sensitivity": sens, "sensitivity_ci_low": sens - 0.05,
              "sensitivity_ci_high": hi, "fn": fn, "tp": tp, "threshold": 0.0579}
          for m in ("baseline", "semi_supervised")}
    ev.update(delta={}, n_test=2 * (fn + tp))
    return {"evaluate": ev, "embed": {"fingerprint": "8cc4a8fe3f886100"}}


def _params(repo_root, **updates):
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    for k, v in updates.items():
        a, b = k.split(".")
        params[a][b] = v
    return params


def test_card_flags_a_test_sensitivity_below_the_target(scene, repo_root):
    rows, X, pred, clusters = scene
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.5)
    params = _params(repo_root, **{"evaluate.target_sensitivity": 0.95})
    card = render_model_card(params, _card_metrics(0.907, 14, 136, hi=0.94), err)
    line = next(s for s in card.splitlines() if "Sensitivity" in s and "target" in s)
    assert line.startswith("> ⚠ **Sensitivity 90.7 % on the test set is below the 95.0 % target**")
    assert "14 of the 150 test images of class **cancer** are missed" in line
    assert "threshold 0.0579" in line and "upper end of its confidence interval (94.0 %)" in line
    # the flag comes before any section: the first thing a reader sees
    assert card.index("⚠") < card.index("## ")
    # within the CI: said so, still flagged
    card = render_model_card(params, _card_metrics(0.94, 9, 141, hi=0.97), err)
    assert "⚠ **Sensitivity 94.0 % on the test set is below the 95.0 % target**" in card
    assert "still includes the target" in card
    # one decimal would read 95.0 % < 95.0 %: two decimals then
    card = render_model_card(params, _card_metrics(0.9496, 8, 150, hi=0.99), err)
    assert "Sensitivity 94.96 % on the test set is below the 95.0 % target" in card


def test_card_says_plainly_when_the_target_is_met_and_uses_singulars(scene, repo_root):
    rows, X, pred, clusters = scene
    pred = pred.assign(proba=pred["id"].map({"id08": 0.1, "id09": 0.1, "id10": 0.2, "id11": 0.8,
                                             "id12": 0.3, "id13": 0.95}))
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.5)
    params = _params(repo_root, **{"evaluate.target_sensitivity": 0.9})
    card = render_model_card(params, _card_metrics(0.96, 1, 24), err, groups=Groups(3, "kmeans"))
    assert "> Sensitivity 96.0 % on the test set meets the 90.0 % target" in card
    assert "1 of the 25 test images of class **cancer** is missed" in card
    assert "⚠" not in card
    assert "1 missed image of class **cancer** on test (false negative;" in card
    assert "missed images" not in card.split("## Known failure modes")[1].split("\n")[1]
    assert "similar-image groups 0 (1 image) of 3" in card and "k-means" in card
    assert not re.search(r"\b1 (images|false negatives|missed images)\b", card)


def test_card_versions_the_model_files_without_date_host_or_commit(scene, repo_root, tmp_path,
                                                                      monkeypatch):
    rows, X, pred, clusters = scene
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.5)
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    (models / "semi_supervised.skops").write_bytes(b"semi")
    (models / "baseline.skops").write_bytes(b"base")
    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    dvc["stages"]["report"]["deps"] += ["data/models/semi_supervised.skops", "data/models/baseline.skops"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    monkeypatch.chdir(tmp_path)
    versions = read_versions("dvc.yaml", "report")
    semi = hashlib.sha256(b"semi").hexdigest()[:12]
    assert versions.models == {"data/models/semi_supervised.skops": semi,
                               "data/models/baseline.skops": hashlib.sha256(b"base").hexdigest()[:12]}
    from importlib.metadata import version
    assert versions.package == version("triage") and not versions.missing
    params = _params(repo_root)
    card = render_model_card(params, _card_metrics(0.96, 1, 24), err, versions=versions)
    assert f"- Model version: `{semi}` (semi-supervised, `data/models/semi_supervised.skops`)" in card
    assert f"- Package: `triage` {version('triage')}." in card
    assert "- Embedding fingerprint: `8cc4a8fe3f886100`" in card
    assert "`git log -1 --format='%h %cI' -- dvc.lock`" in card
    # nothing that differs between machines or runs
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", card)
    assert socket.gethostname() not in card
    assert card == render_model_card(params, _card_metrics(0.96, 1, 24), err, versions=read_versions())


def test_model_files_are_the_model_artifacts_among_the_stage_deps(repo_root):
    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    artifacts = sorted(a["path"] for a in dvc["artifacts"].values() if a["type"] == "model")
    used, missing = model_files(dvc, "evaluate")
    assert sorted(used) == artifacts and missing == []
    assert model_files({"stages": {"report": {"deps": ["x.py"]}}, "artifacts": {}}) == ([], [])
    card_missing = render_model_card(_params(repo_root), _card_metrics(0.96, 1, 24),
                                     error_table(pd.DataFrame(columns=["id", "label", "proba"]),
                                                 pd.DataFrame(columns=["id", "split", "label", "path"]),
                                                 np.zeros((0, 2)), pd.Series(dtype=int), "cancer", 0.5),
                                     versions=Versions({}, "0.1.0", ("data/models/semi_supervised.skops",)))
    assert "Model version: not recorded: `data/models/semi_supervised.skops` are not deps" in card_missing


def test_report_stage_depends_on_the_model_files_its_card_versions(repo_root):
    """The card's model version is the sha256 of the report stage's model deps: without them
    in dvc.yaml the card would say 'not recorded' (and not re-run when only a model changes)."""
    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    used, missing = model_files(dvc, "report")
    assert "data/models/semi_supervised.skops" in used and not missing, \
        "add data/models/semi_supervised.skops and data/models/baseline.skops to the report stage's deps"


# --------------------------------------------------------------------------- card: triage KPI
def _triage_block(thr, sens, aside, missed, n_pos=150) -> dict:
    return {"threshold": thr, "sensitivity": sens, "sensitivity_ci_low": sens - 0.05,
            "sensitivity_ci_high": min(sens + 0.03, 1.0), "set_aside": aside,
            "set_aside_ci_low": aside - 0.04, "set_aside_ci_high": aside + 0.05,
            "missed": missed, "missed_ci_low": max(missed - 5.3, 0.0), "missed_ci_high": missed + 8.4}


TRIAGE = {"s90": _triage_block(0.0982, 0.893, 0.277, 16), "s95": _triage_block(0.0579, 0.96, 0.23, 4),
          "s98": _triage_block(0.0400, 0.993, 0.197, 1)}


def _triage_metrics(models=("baseline", "semi_supervised")) -> dict:
    metrics = _card_metrics(0.96, 6, 144)
    for m in models:
        metrics["evaluate"].setdefault(m, dict(metrics["evaluate"]["semi_supervised"]))
        metrics["evaluate"][m]["triage"] = TRIAGE
    return metrics


# model, target, threshold, sensitivity, set aside, missed: the table rows the card shows
TRIAGE_ROWS = [
    ("semi-supervised", "0.90", "0.0982", "89.3 % [84.3–92.3 %]", "27.7 % [23.7–32.7 %]", "16 [10.7–24.4]"),
    ("semi-supervised", "0.95", "0.0579", "96.0 % [91.0–99.0 %]", "23.0 % [19.0–28.0 %]", "4 [0.0–12.4]"),
    ("semi-supervised", "0.98", "0.0400", "99.3 % [94.3–100.0 %]", "19.7 % [15.7–24.7 %]", "1 [0.0–9.4]"),
    ("baseline", "0.95", "0.0579", "96.0 % [91.0–99.0 %]", "23.0 % [19.0–28.0 %]", "4 [0.0–12.4]"),
]


@pytest.mark.parametrize("row", TRIAGE_ROWS)
def test_card_has_the_triage_table_at_three_targets(scene, repo_root, row):
    rows, X, pred, clusters = scene
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.5)
    card = render_model_card(_params(repo_root), _triage_metrics(), err)
    assert "## Triage at three sensitivity targets" in card
    section = card.split("## Triage at three sensitivity targets")[1].split("\n## ")[0]
    assert ("| model | target | threshold | test sensitivity [CI] | set aside [CI] | "
            "missed positives (cancer) [CI] |") in section
    assert "| " + " | ".join(row) + " |" in section
    assert sum(line.startswith(("| semi-supervised |", "| baseline |"))
               for line in section.splitlines()) == 6
    # after the performance table, before the failure modes
    assert card.index("## Performance") < card.index("## Triage") < card.index("## Known failure")
    assert "out-of-fold" in section and "never on test" in section


@pytest.mark.parametrize("line", [
    "- At the 0.90 target a reader could set aside 27.7 % of images (CI 23.7–32.7 %) and would "
    "miss 16 cancers (CI 10.7–24.4); test sensitivity 89.3 %, below the target.",
    "- At the 0.95 target a reader could set aside 23.0 % of images (CI 19.0–28.0 %) and would "
    "miss 4 cancers (CI 0.0–12.4); test sensitivity 96.0 %.",
    "- At the 0.98 target a reader could set aside 19.7 % of images (CI 15.7–24.7 %) and would "
    "miss 1 cancer (CI 0.0–9.4); test sensitivity 99.3 %.",
])
def test_card_says_plainly_what_a_reader_could_set_aside_and_miss(scene, repo_root, line):
    rows, X, pred, clusters = scene
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.5)
    card = render_model_card(_params(repo_root), _triage_metrics(), err)
    assert line in card.splitlines()
    assert "The semi-supervised model:" in card
    assert "prevalence (150 images of class cancer among 300, 50.0 %)" in card


def test_card_triage_table_adds_finetuned_and_is_absent_without_the_metrics(scene, repo_root):
    rows, X, pred, clusters = scene
    err = error_table(pred, rows, X, clusters, "cancer", threshold=0.5)
    card = render_model_card(_params(repo_root),
                             _triage_metrics(("baseline", "semi_supervised", "finetuned")), err)
    assert "| finetuned | 0.98 | 0.0400 |" in card
    assert "## Triage" not in render_model_card(_params(repo_root), _card_metrics(0.96, 6, 144), err)
    # two targets: the heading counts them
    two = _triage_metrics()
    for m in ("baseline", "semi_supervised"):
        two["evaluate"][m]["triage"] = {k: TRIAGE[k] for k in ("s90", "s95")}
    assert "## Triage at two sensitivity targets" in render_model_card(_params(repo_root), two, err)
