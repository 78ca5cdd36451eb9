"""Label audit (stage `audit`, triage/audit.py): cleanlab on the baseline's out-of-fold P."""
import csv
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from triage.audit import COLUMNS, audit_labels, audit_stats, baseline_oof, read_review, to_review
from triage.errors import ParamsError, PipelineError
from triage.models import make_classifier, out_of_fold_proba
from triage.params import check
from triage.report import render_errors_html

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
POSITIVE = PARAMS["data"]["positive_class"]

# The demo's labelled set (100 images, 50/50) as the pipeline makes and embeds it: the
# default demo (data.demo) and the default embedder (embed.*: random weights, embed.layers
# auto = ResNet18's layer1 + layer2, avg+max pooled). A wrong label can only be found where
# the model recognises the image's true class: with the network's final features (out-of-fold
# ROC-AUC ~0.76 on this demo) about 1.6 of 5 flipped labels reach the top 10; with the
# default layers (~0.95) about 4 (docs/active_learning.md, "Label audit").
N_FLIP_SETS = 10


@pytest.fixture(scope="module")
def demo_labelled(tmp_path_factory):
    """(ids, true labels, paths, vectors) of the default demo's labelled set, embedded with
    the default embedder."""
    from triage.demo import generate_demo
    from triage.embed import Embedder

    out = tmp_path_factory.mktemp("audit_demo")
    demo, e = PARAMS["data"]["demo"], PARAMS["embed"]
    generate_demo(out, n_labeled=demo["n_labeled"], n_unlabeled=0, n_test=0,
                  seed=PARAMS["data"]["seed"], image_size=demo["image_size"],
                  difficulty=demo["difficulty"], benign_mass_rate=demo["benign_mass_rate"],
                  prevalence=demo["prevalence"])
    paths = sorted((out / "labeled").rglob("*.png"))
    emb = Embedder(e["weights"], backbone=e["backbone"], seed=e["seed"],
                   image_size=e["image_size"], crop=e["crop"], layers=e["layers"],
                   batch_size=50, num_workers=0, device="cpu").fit()
    X = emb.transform([str(p) for p in paths])
    ids = np.array([p.stem for p in paths], dtype=object)
    y = np.array([p.parent.name for p in paths], dtype=object)
    return ids, y, [str(p) for p in paths], X


def train_oof(X, y):
    """The baseline's out-of-fold P(positive), as the train stage computes it (train.*)."""
    t = PARAMS["train"]
    pipe = make_classifier(t["model"], t["C"], t["class_weight"], t["seed"], t["calibration"])
    return out_of_fold_proba(pipe, X, y, POSITIVE, t["cv_folds"], t["seed"])


def test_five_flipped_labels_are_among_the_ten_most_suspicious_rows(demo_labelled):
    """Issue #16: flip 5 labels, at least 4 among the 10 highest-ranked rows of
    to_review.csv. One flip set is one draw (which 5 images were flipped decides much), so
    the criterion is asserted for the typical one: the median over 10 seeded flip sets."""
    ids, y, paths, X = demo_labelled
    truth = dict(zip(ids, y))
    found_per_set = []
    for seed in range(N_FLIP_SETS):
        flip = np.random.default_rng(seed).choice(len(y), 5, replace=False)
        given = y.copy()
        given[flip] = np.where(y[flip] == POSITIVE, "normal", POSITIVE)
        audit = audit_labels(ids, given, train_oof(X, given), POSITIVE,
                             PARAMS["audit"]["filter_by"])
        review = to_review(audit, pd.Series(paths, index=ids), PARAMS["audit"]["max_rows"])
        top = review.head(10)
        found = set(top["id"]) & set(ids[flip])
        found_per_set.append(len(found))
        # the suggestion is the true class for every flipped image found
        assert all(r.suggested_label == truth[r.id] for r in top.itertuples() if r.id in found)
        assert review["score"].is_monotonic_decreasing
        assert audit_stats(audit, review)["n_audited"] == 100
    assert np.median(found_per_set) >= 4, (
        f"flipped labels found in the top 10, per flip set: {found_per_set}")


@pytest.mark.filterwarnings("ignore:May not flag all label issues")  # 2 images: on purpose
def test_audit_uses_the_baseline_and_ranks_by_one_minus_p_of_the_given_label():
    oof = pd.DataFrame({"id": ["a", "b", "a", "b"], "model": ["baseline"] * 2 + ["semi_supervised"] * 2,
                        "label": ["cancer", "normal"] * 2, "proba": [0.2, 0.1, 0.9, 0.1]})
    base = baseline_oof(oof)
    assert base["proba"].tolist() == [0.2, 0.1]
    audit = audit_labels(base["id"], base["label"], base["proba"], "cancer")
    assert audit["id"].tolist() == ["a", "b"]  # most suspicious first
    assert audit["score"].tolist() == pytest.approx([0.8, 0.1])
    assert audit["suggested_label"].tolist() == ["normal", "cancer"]
    with pytest.raises(PipelineError, match="another class"):
        audit_labels(["a", "b"], ["cancer", "cancer"], [0.9, 0.8], "cancer")
    with pytest.raises(PipelineError, match="baseline"):
        baseline_oof(oof[oof["model"] == "semi_supervised"])


def test_audit_params_are_validated():
    assert check("audit.filter_by", "prune_by_noise_rate") == "prune_by_noise_rate"
    with pytest.raises(ParamsError, match="audit.filter_by"):
        check("audit.filter_by", "prune_everything")
    with pytest.raises(ParamsError, match="audit.max_rows"):
        check("audit.max_rows", 0)
    with pytest.raises(ParamsError, match="audit.filter_by"):
        audit_labels(["a", "b"], ["cancer", "normal"], [0.9, 0.1], "cancer", "nope")


# --------------------------------------------------------------------------- the stage
@pytest.fixture
def stage_inputs(tmp_path):
    """OOF table (baseline doubts 3 labels, semi_supervised doubts none) + clean manifest;
    the most doubted image has a path a spreadsheet would run as a formula."""
    rng = np.random.default_rng(1)
    n = 40
    ids = [f"{i:064x}" for i in range(n)]
    label = np.array(["cancer", "normal"] * (n // 2), dtype=object)
    p = np.where(label == "cancer", rng.uniform(0.75, 0.95, n), rng.uniform(0.05, 0.25, n))
    doubted = [0, 3, 6]  # cancer, normal, cancer: scored confidently as the other class
    p[doubted] = [0.02, 0.97, 0.05]
    oof = pd.concat([pd.DataFrame({"id": ids, "model": "baseline", "label": label, "proba": p}),
                     pd.DataFrame({"id": ids, "model": "semi_supervised", "label": label,
                                   "proba": np.where(label == "cancer", 0.9, 0.1)})])
    (tmp_path / "data/models").mkdir(parents=True)
    oof.to_parquet(tmp_path / "data/models/oof_predictions.parquet")
    paths = [f"data/raw/labeled/{lbl}/{i}.png" for i, lbl in enumerate(label)]
    paths[0] = '=HYPERLINK("http://example.invalid","x").png'
    (tmp_path / "data/qc").mkdir(parents=True)
    pd.DataFrame({"id": ids, "path": paths, "split": "labeled", "label": label}).to_parquet(
        tmp_path / "data/qc/manifest_clean.parquet")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path, [ids[i] for i in doubted]


def run_audit_stage(repo: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DVCLIVE_TEST"}  # log for real
    return subprocess.run([sys.executable, str(ROOT / "stages/audit.py")], cwd=repo, env=env,
                          capture_output=True, text=True)


def test_stage_writes_the_contract_csv_neutralised_and_its_metrics(stage_inputs):
    repo, doubted = stage_inputs
    res = run_audit_stage(repo)
    assert res.returncode == 0, res.stderr
    out = repo / "data/annotation/to_review.csv"
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == COLUMNS == ["id", "path", "given_label", "suggested_label", "score"]
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert [r["id"] for r in body] == doubted  # only the baseline's doubts, worst first
    assert body[0]["path"].startswith("'=HYPERLINK(")  # a formula cell is written as text
    assert [(r["given_label"], r["suggested_label"]) for r in body] == [
        ("cancer", "normal"), ("normal", "cancer"), ("cancer", "normal")]
    scores = [float(r["score"]) for r in body]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(0.98)
    review = read_review(out)
    assert list(review.columns) == COLUMNS and review["score"].dtype == float
    metrics = json.loads((repo / "metrics/audit/metrics.json").read_text())
    assert metrics == {"n_audited": 40, "n_flagged": 3, "n_to_review": 3,
                       "flagged": {"cancer": 2, "normal": 1}}
    logged = yaml.safe_load((repo / "metrics/audit/params.yaml").read_text())
    assert logged["method"] == "cleanlab.filter.find_label_issues"
    assert logged["filter_by"] == PARAMS["audit"]["filter_by"]


def test_stage_caps_the_csv_at_max_rows(stage_inputs):
    repo, doubted = stage_inputs
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["audit"]["max_rows"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert run_audit_stage(repo).returncode == 0
    assert read_review(repo / "data/annotation/to_review.csv")["id"].tolist() == doubted[:2]
    metrics = json.loads((repo / "metrics/audit/metrics.json").read_text())
    assert metrics["n_flagged"] == 3 and metrics["n_to_review"] == 2


def test_dvc_yaml_declares_the_audit_stage_and_the_report_reads_it():
    stage = DVC["stages"]["audit"]
    assert stage["cmd"] == "python -m stages.audit"
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
    assert {"data/models/oof_predictions.parquet", "data/qc/manifest_clean.parquet"} <= set(deps)
    assert "audit" in stage["params"]
    assert "data/annotation/to_review.csv" in stage["outs"]  # cached: it holds image paths
    assert {"metrics/audit": {"cache": False}} in stage["outs"]
    assert "metrics/audit/metrics.json" in DVC["metrics"]
    report = [d if isinstance(d, str) else next(iter(d)) for d in DVC["stages"]["report"]["deps"]]
    assert "data/annotation/to_review.csv" in report


# --------------------------------------------------------------------------- errors page
class _Cards(HTMLParser):
    def __init__(self):
        super().__init__()
        self.audit_cards, self.imgs = 0, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.audit_cards += tag == "div" and "audit" in (a.get("class") or "").split()
        self.imgs += tag == "img" and (a.get("src") or "").startswith("data:image/png;base64,")


def test_errors_page_shows_the_flagged_images_with_given_suggested_and_score(tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)).save(p)
        paths.append(str(p))
    review = pd.DataFrame({"id": ["a", "b"], "path": paths, "given_label": ["normal", "<b>x"],
                           "suggested_label": ["cancer", "normal"], "score": [0.987, 0.51]})
    empty = pd.DataFrame({"id": [], "model": [], "label": [], "proba": [], "kind": []})
    html = render_errors_html({"baseline": empty}, {"baseline": 0.5}, 10, "cancer", review=review)
    cards = _Cards()
    cards.feed(html)
    assert cards.audit_cards == 2 and cards.imgs == 2
    assert "Label audit of the labelled set: 2 images to review" in html
    assert "given <b>normal</b> → suggested <b>cancer</b>" in html and "score 0.987" in html
    assert "&lt;b&gt;x" in html and "<b>x" not in html  # labels are escaped
    one = render_errors_html({"baseline": empty}, {"baseline": 0.5}, 10, "cancer",
                             review=review.head(1))
    assert "1 image to review" in one
    none = render_errors_html({"baseline": empty}, {"baseline": 0.5}, 10, "cancer",
                              review=review.head(0))
    assert "0 images to review" in none and "none flagged" in none
    assert "label-audit" not in render_errors_html({"baseline": empty}, {"baseline": 0.5}, 10,
                                                   "cancer")
