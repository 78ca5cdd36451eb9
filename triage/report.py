"""Error analysis page (``reports/errors.html``) and model card (``reports/model_card.md``).

Both are regenerated on every run from the pipeline's own outputs, so they cannot drift
from the metrics. Deterministic (no timestamps, hosts or commits) so DVC hashes stay
stable: the card's version is the sha256 of the model files, the package version and the
embedding fingerprint, and it tells the reader how to get the commit and date from git.
Scores are set beside their threshold with :func:`triage.pages.fmt_scores`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .neighbours import cosine_knn
from .pages import (
    BASE_CSS,
    PAGE_END,
    THUMB_PX,
    fmt_score,
    fmt_scores,
    page_head,
    plural,
    score_vs_threshold,
    thumbnail_html,
)

MAX_ERRORS = 60       # error cards shown per kind (FN, FP); the parquet keeps them all
N_NEIGHBOURS = 3
# Neighbours are shown as large as the error itself (a 48 px copy is too small to judge);
# the card is as wide as the three of them side by side.
ERRORS_CSS = BASE_CSS + f"""
.card.err{{width:{N_NEIGHBOURS * THUMB_PX + (N_NEIGHBOURS - 1) * 6}px}}
.nbs{{display:flex;gap:6px}}.nb{{text-align:center;font-size:.9em}}
.legend{{border:1px solid #ddd;padding:6px 12px;font-size:.9em}}
"""
CLUSTER_METHODS = {"kmeans": "k-means", "gmm": "a Gaussian mixture", "hdbscan": "HDBSCAN"}
COMMIT_AND_DATE = "git log -1 --format='%h %cI' -- dvc.lock"


@dataclass(frozen=True)
class Groups:
    """The clusters of stage ``cluster`` as the pages name them: groups of visually similar
    images (by embedding), never a diagnosis or a class. ``n``: groups found (noise, -1,
    is not one); ``method``: cluster.method."""

    n: int | None = None
    method: str | None = None

    def name(self, cluster) -> str:
        """``"similar-image group 4 of 12"`` (``"in no similar-image group"`` for noise)."""
        if cluster is None or pd.isna(cluster):
            return "similar-image group: —"
        c = int(cluster)
        if c < 0:
            return "in no similar-image group (outlier)"
        return f"similar-image group {c}" + (f" of {self.n}" if self.n else "")

    def how(self) -> str:
        """How the groups were made, for a legend: method, count, what they mean."""
        by = CLUSTER_METHODS.get(self.method or "", self.method or "clustering")
        n = f"{self.n} " if self.n else ""
        numbered = f", numbered 0 to {self.n - 1}" if self.n else ""
        return (f"the images were sorted into {n}groups of visually similar images{numbered} by "
                f"{by} on their embeddings (stage <code>cluster</code>, "
                f"<code>data/cluster/assignments.parquet</code>); images in one group look alike "
                f"to the model. A group is not a diagnosis or a class: several errors in one "
                f"group point to a kind of image the model handles badly.")


def nearest_labelled(X_query: np.ndarray, X_labelled: np.ndarray, k: int = N_NEIGHBOURS,
                     backend: str = "sklearn") -> np.ndarray:
    """Indices of the k most cosine-similar labelled vectors for each query row, most
    similar first: similarities snapped per row (triage.canonical) so equal ones tie
    exactly and a stable sort gives them to the lower index. ``backend``
    (``cluster.backend``) finds them: every pair (one BLAS product), or certified FAISS
    candidates on unit vectors (triage.neighbours.cosine_knn): the same indices."""
    k = min(int(k), len(X_labelled))
    if k < 1:
        return np.zeros((len(X_query), 0), dtype=np.int64)
    return cosine_knn(X_query, X_labelled, k, backend)


def error_table(pred: pd.DataFrame, rows: pd.DataFrame, X: np.ndarray, clusters: pd.Series,
                positive: str, threshold: float, backend: str = "sklearn") -> pd.DataFrame:
    """False negatives then false positives on test, with cluster and labelled neighbours.

    ``pred``: id, label, proba for one model on test; ``rows``: embedding rows (id, split,
    label, path) aligned with ``X``; ``clusters``: cluster id by image id; ``backend``:
    ``cluster.backend``, the library of the nearest-labelled search.
    """
    y = pred["label"] == positive
    flagged = pred["proba"] >= threshold
    err = pred[(y & ~flagged) | (~y & flagged)].copy()
    err["kind"] = np.where(err["label"] == positive, "false negative", "false positive")
    # FN first (the costly error in triage), then the most confident mistakes first.
    err["_rank"] = np.where(err["kind"] == "false negative", 0, 1)
    err["_conf"] = np.where(err["kind"] == "false negative", err["proba"], -err["proba"])
    err = err.sort_values(["_rank", "_conf", "id"]).drop(columns=["_rank", "_conf"])
    index = pd.Series(np.arange(len(rows)), index=rows["id"].to_numpy())
    lab = np.flatnonzero((rows["split"] == "labeled").to_numpy())
    if len(err) and len(lab):
        q = X[index.loc[err["id"]].to_numpy()]
        nn = nearest_labelled(q, X[lab], backend=backend)
        err["neighbours"] = [[(rows["path"].iloc[lab[j]], rows["label"].iloc[lab[j]])
                              for j in row] for row in nn]
    else:
        err["neighbours"] = [[] for _ in range(len(err))]
    err["cluster"] = err["id"].map(clusters).astype("Int64")
    err["path"] = err["id"].map(rows.drop_duplicates("id").set_index("id")["path"])
    return err.reset_index(drop=True)


def _error_card(r, kind: str, positive: str, negative: str, threshold: float,
                groups: Groups) -> str:
    """One error: its thumbnail, score against the threshold, truth, similar-image group,
    path and labelled neighbours (each as large as the error)."""
    nbrs = "".join(f"<div class='nb'>{thumbnail_html(p, THUMB_PX, sized=True)}"
                   f"<span>{escape(str(lbl))}</span></div>" for p, lbl in r["neighbours"])
    return (f"<div class='card err' data-kind='{kind}'>{thumbnail_html(r['path'], THUMB_PX, sized=True)}"
            f"<div><b>{escape(score_vs_threshold(r['proba'], threshold, positive, negative))}</b></div>"
            f"<div>truth: {escape(str(r['label']))}; {escape(groups.name(r['cluster']))}</div>"
            f"<div class='muted path'>{escape(str(r['path']))}</div>"
            f"<div class='muted'>nearest labelled images:</div><div class='nbs'>{nbrs}</div></div>")


def _model_errors(model: str, err: pd.DataFrame, threshold: float, positive: str,
                  max_errors: int, negative: str, groups: Groups) -> list[str]:
    """One model's section: false negatives, then false positives, at most max_errors each."""
    n_fn = int((err["kind"] == "false negative").sum())
    n_fp = int((err["kind"] == "false positive").sum())
    parts = [f"<h2 id='{escape(model)}'>{escape(model)} — threshold "
             f"{fmt_score(threshold)}: {plural(n_fn, 'false negative')}, "
             f"{plural(n_fp, 'false positive')}</h2>"]
    for kind in ("false negative", "false positive"):
        sub = err[err["kind"] == kind]
        parts.append(f"<h3>{kind}s ({len(sub)})</h3>")
        if sub.empty:
            parts.append("<p class='muted'>none</p>")
            continue
        parts.append("<div class='grid'>")
        parts += [_error_card(r, kind, positive, negative, threshold, groups)
                  for _, r in sub.head(max_errors).iterrows()]
        parts.append("</div>")
        if len(sub) > max_errors:
            parts.append(f"<p class='muted'>{len(sub) - max_errors} more not shown "
                         f"(all are in data/evaluate/test_predictions.parquet).</p>")
    return parts


def _legend(positive: str, negative: str, groups: Groups) -> str:
    pos, neg = escape(positive), escape(negative)
    return ("<div class='legend'><b>How to read a card.</b><ul>"
            f"<li><b>score</b>: the model's P({pos}) for the image, from 0 to 1. At or above the "
            f"model's threshold the image is predicted {pos}, below it {neg}. Score and threshold "
            f"are printed with the same significant digits, so a small score reads e.g. 0.0000312, "
            f"never 0.000.</li>"
            f"<li><b>similar-image group</b>: {groups.how()}</li>"
            f"<li><b>nearest labelled images</b>: the {N_NEIGHBOURS} labelled training images "
            f"whose embeddings are most similar (cosine), with their label.</li></ul></div>")


def _audit_card(r) -> str:
    """One labelled image the label audit doubts: thumbnail, given vs suggested label,
    score, path."""
    return (f"<div class='card audit'>{thumbnail_html(r['path'], THUMB_PX, sized=True)}"
            f"<div>given <b>{escape(str(r['given_label']))}</b> → suggested "
            f"<b>{escape(str(r['suggested_label']))}</b></div>"
            f"<div>score {escape(fmt_score(float(r['score'])))}</div>"
            f"<div class='muted path'>{escape(str(r['path']))}</div></div>")


def _audit_section(review: pd.DataFrame) -> list[str]:
    """The label audit (stage ``audit``, ``data/annotation/to_review.csv``): the labelled
    images whose given label the baseline's out-of-fold probability doubts most."""
    parts = [f"<h2 id='label-audit'>Label audit of the labelled set: "
             f"{plural(len(review), 'image')} to review</h2>",
             "<p class='muted'>Labelled training images whose given label the labelled-only "
             "baseline doubts, from its out-of-fold probabilities (each image scored by a model "
             "that never saw it), flagged with cleanlab's confident learning "
             "(<code>cleanlab.filter.find_label_issues</code>, <code>audit.filter_by</code>). "
             "<b>score</b> = 1 − out-of-fold P(given label): higher = more likely mislabelled; "
             "most suspicious first. A flag asks for a second reader, it is not a correction: "
             "see docs/active_learning.md (<code>data/annotation/to_review.csv</code>).</p>"]
    if review.empty:
        parts.append("<p class='muted'>none flagged</p>")
        return parts
    parts += ["<div class='grid'>", *(_audit_card(r) for _, r in review.iterrows()), "</div>"]
    return parts


def render_errors_html(errors: dict[str, pd.DataFrame], thresholds: dict[str, float],
                       n_test: int, positive: str, max_errors: int = MAX_ERRORS, *,
                       negative: str | None = None, groups: Groups | None = None,
                       review: pd.DataFrame | None = None) -> str:
    """One section per model; within it false negatives first. ``negative``: the other
    class's name (default "not <positive>"); ``groups``: how the clusters are named;
    ``review``: the label audit's rows (to_review.csv columns), a last section."""
    negative = negative or f"not {positive}"
    groups = groups or Groups()
    parts = [page_head("Error analysis", ERRORS_CSS),
             "<h1>Error analysis on the held-out test set</h1>",
             f"<p class='warn'>Decision support for triage, not a diagnosis. Each card is an "
             f"error at the model's operating threshold; images are shown as the pipeline sees "
             f"them (greyscale). Positive class: <b>{escape(positive)}</b>; "
             f"{plural(n_test, 'test image')}.</p>",
             _legend(positive, negative, groups)]
    for model, err in errors.items():
        parts += _model_errors(model, err, thresholds[model], positive, max_errors, negative, groups)
    if review is not None:
        parts += _audit_section(review)
    parts.append(PAGE_END)
    return "\n".join(parts)


def _fmt_ci(m: dict, key: str, pct: bool = True) -> str:
    v, lo, hi = m.get(key), m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if v is None:
        return "n/a"
    if pct:
        s = f"{100 * v:.1f} %"
        return s + (f" ({100 * lo:.1f}–{100 * hi:.1f})" if lo is not None else "")
    s = f"{v:.3f}"
    return s + (f" ({lo:.3f}–{hi:.3f})" if lo is not None else "")


# --------------------------------------------------------------------------- model card
# Each section returns its lines, heading first; render_model_card puts a blank line before each.
PERFORMANCE_ROWS = (("ROC-AUC", "roc_auc", False), ("PR-AUC", "pr_auc", False),
                    ("sensitivity", "sensitivity", True), ("specificity", "specificity", True),
                    ("PPV", "ppv", True), ("NPV", "npv", True), ("Brier score", "brier", False),
                    ("ECE", "ece", False))

LIMITATIONS = (
    "## Limitations",
    "- ~100 labels give wide confidence intervals; differences whose CI spans 0 are not "
    "evidence of improvement.",
    "- Pseudo-labels inherit the biases of the labelled set and of the frozen features; "
    "their accuracy is only measured when hidden truth exists (demo).",
    "- Exact duplicates are removed, but near-duplicates and patient-level overlap "
    "between splits can still inflate test metrics unless the data has patient ids.",
    "- Calibration is only as good as the test set's class balance: probabilities are not "
    "risks for a population with another prevalence.",
)

ETHICS = (
    "## Ethical and RGPD/GDPR notes",
    "- Images are health data: they, the embeddings and the models are DVC outputs stored "
    "in access-controlled DVC remotes, never in git; logs carry counts, not identifiers.",
    "- Reports (`reports/*.html`) embed image thumbnails and are DVC outputs too: share "
    "them only with people entitled to see the images.",
    "- A legal basis, a DPIA and clinical validation are required before any use on "
    "patients; this repository provides none of them.",
    "- DICOM inputs are de-identified before any stage reads them (keyed pseudonyms; the key and "
    "the re-identification table stay outside the repository); what is removed, kept and not done "
    "(no OCR of burned-in text; non-DICOM file names are not de-identified): docs/privacy.md.",
)

MONITORING = (
    "## Monitoring to do",
    "- Re-run QC and compare intensity/shift statistics for every new batch; investigate "
    "any rise in quarantine rate or KS shift.",
    "- Track the positive rate of flagged images and the sensitivity on audited cases; "
    "re-set the threshold on fresh labelled data if either drifts.",
)


# --------------------------------------------------------------------------- versions
@dataclass(frozen=True)
class Versions:
    """What identifies the result a card describes, all of it in the card's own inputs (no
    date, host or commit: the card's bytes are hashed in dvc.lock and must be the same on
    every machine and re-run; the commit that will hold the result does not exist yet).

    ``models``: model file → first 12 hex digits of its sha256; ``missing``: model files
    (dvc.yaml artifacts) the report stage does not depend on, so not versioned here."""

    models: dict = field(default_factory=dict)
    package: str = "unknown"
    missing: tuple = ()


def file_version(path, n: int = 12) -> str:
    """First ``n`` hex digits of the sha256 of a file's bytes (``sha256sum`` gives them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def _dep_path(d) -> str:
    return d if isinstance(d, str) else next(iter(d))


def model_files(dvc: dict, stage: str = "report") -> tuple[list[str], list[str]]:
    """(model files among the stage's deps, model files it does not depend on), read from
    dvc.yaml: a model is an ``artifacts`` entry of type model, or a ``.skops`` dep."""
    models = [a["path"] for a in (dvc.get("artifacts") or {}).values() if a.get("type") == "model"]
    deps = [_dep_path(d) for d in dvc["stages"][stage].get("deps", [])]
    used = [d for d in deps if d in models or d.endswith(".skops")]
    return used, [m for m in models if m not in used]


def package_version(dist: str = "triage") -> str:
    """The installed version of the project (pyproject.toml's, via importlib.metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown (package not installed: pip install -e .)"


def read_versions(dvc_yaml="dvc.yaml", stage: str = "report") -> Versions:
    """The :class:`Versions` of a stage from dvc.yaml and the model files on disk."""
    used, missing = model_files(yaml.safe_load(Path(dvc_yaml).read_text()), stage)
    return Versions({m: file_version(m) for m in used}, package_version(), tuple(missing))


# --------------------------------------------------------------------------- model card sections
def _pct(v: float, ref: float | None = None) -> str:
    """A share as "91.3 %"; two decimals when one would make ``v`` read equal to ``ref``."""
    s = f"{100 * v:.1f} %"
    if ref is not None and v != ref and s == f"{100 * ref:.1f} %":
        s = f"{100 * v:.2f} %"
    return s


def _card_title() -> list[str]:
    return ["# Model card: semi-supervised image triage classifier",
            "",
            "*Generated by `dvc repro` (stage `report`) from params.yaml and the metrics files; "
            "do not edit by hand.*"]


def _sensitivity_status(params: dict, metrics: dict) -> list[str]:
    """One visible line: the test sensitivity of the served model against the target."""
    s = metrics.get("evaluate", {}).get("semi_supervised", {})
    sens, target = s.get("sensitivity"), params["evaluate"]["target_sensitivity"]
    if sens is None:
        return []
    pos = params["data"]["positive_class"]
    fn, tp = s.get("fn"), s.get("tp")
    if fn is not None and tp is not None:
        missed = (f"{fn} of the {plural(fn + tp, 'test image')} of class **{pos}** "
                  f"{'is' if fn == 1 else 'are'} missed")
    elif fn is not None:
        missed = f"{plural(fn, 'test image')} of class **{pos}** {'is' if fn == 1 else 'are'} missed"
    else:
        missed = f"some test images of class **{pos}** are missed"
    thr = s.get("threshold")
    at = f"at this operating point (threshold {fmt_score(thr)})" if thr is not None else "at this operating point"
    lo, hi = s.get("sensitivity_ci_low"), s.get("sensitivity_ci_high")
    if sens < target:
        head = (f"> ⚠ **Sensitivity {_pct(sens, target)} on the test set is below the "
                f"{_pct(target)} target**: {at} {missed} (false negatives).")
        if lo is not None and hi is not None:
            head += (f" Even the upper end of its confidence interval ({_pct(hi, target)}) is below "
                     "the target." if hi < target else
                     f" Its confidence interval ({_pct(lo)}–{_pct(hi)}) still includes the target: "
                     "the shortfall may be chance on this test set, but it is not evidence that the "
                     "target is met.")
        return [head]
    return [f"> Sensitivity {_pct(sens, target)} on the test set meets the {_pct(target)} target; "
            f"{at} {missed} (false negatives)."]


def _version(params: dict, metrics: dict, versions: Versions | None) -> list[str]:
    v = versions or Versions()
    missing = ", ".join(f"`{m}`" for m in v.missing)
    if v.models:
        lines = ["## Version",
                 "- Model version: " + "; ".join(f"`{h}` ({Path(m).stem.replace('_', '-')}, `{m}`)"
                                                 for m, h in v.models.items())
                 + ": the first 12 hex digits of each file's sha256 (`sha256sum FILE`)."]
        if missing:
            lines.append(f"- Not versioned here (not deps of the report stage in dvc.yaml): {missing}.")
    else:
        lines = ["## Version",
                 "- Model version: not recorded" + (f": {missing} are not deps of the report stage in "
                                                    "dvc.yaml." if missing else
                                                    " (no model file among the report stage's deps).")]
    fp = metrics.get("embed", {}).get("fingerprint", "see metrics/embed")
    lines += [f"- Package: `triage` {v.package}.",
              f"- Embedding fingerprint: `{fp}` (the vectors the model was trained on and expects).",
              f"- Commit and date of this result: run `{COMMIT_AND_DATE}` in the repository (the "
              "commit that recorded this card's hash in dvc.lock). The card holds no date, host or "
              "commit, so that its bytes are the same on every machine and every re-run."]
    return lines


def _intended_use(params: dict) -> list[str]:
    pos = params["data"]["positive_class"]
    target = params["evaluate"]["target_sensitivity"]
    return [
        "## Intended use",
        f"- **Triage aid**: ranks images so that those likely to show **{pos}** are read first. "
        "Every image still needs a qualified human reader; the output is never a diagnosis.",
        f"- Operating point chosen for sensitivity: the threshold reaches {_pct(target)} "
        "sensitivity on out-of-fold predictions of the labelled set (never on test).",
        "- Not for: autonomous decisions, populations or devices unlike the training data, "
        "images that fail QC.",
    ]
def _data_and_provenance(params: dict, metrics: dict) -> list[str]:
    d, p = params["data"], params["pseudo"]
    qc, ps, tr = (metrics.get(k, {}) for k in ("qc", "pseudo_label", "train"))
    return [
        "## Data and provenance",
        f"- Source: `{d['source']}`" + (" (synthetic demo images: metrics show the pipeline "
                                        "works, not clinical performance)" if d["source"] == "demo"
                                        else f" (`{d['root']}`)") + ".",
        f"- QC: {qc.get('n_images', 'n/a')} images in, {qc.get('n_passed', 'n/a')} passed, "
        f"{qc.get('n_quarantined', 'n/a')} quarantined (reasons in `data/qc/quarantine.csv`); "
        f"test images with a copy on the training side: "
        f"{qc.get('leaked_test_images', 'n/a')} identical, "
        f"{qc.get('near_leaked_test_images', 'n/a')} near-identical (pHash), of which "
        f"{qc.get('near_leaked_test_dropped', 'n/a')} dropped and "
        f"{qc.get('near_moved_to_labeled', 'n/a')} moved to the labelled side "
        f"(policy `{params['qc']['leakage_policy']}`"
        + (": kept copies make the test metrics optimistic" if params["qc"]["leakage_policy"]
           == "keep" else ": the test set holds no copy of a training image")
        + "; CV folds keep near-duplicate groups together).",
        f"- Labelled training images: {tr.get('n_labeled', 'n/a')}; pseudo-labelled pool images "
        f"used: {tr.get('n_pseudo', 'n/a')} of {ps.get('n_pool', 'n/a')} "
        f"(strategy `{p['strategy']}`).",
    ]


def _method(params: dict, metrics: dict) -> list[str]:
    t, emb = params["train"], metrics.get("embed", {})
    backbone, layers = params["embed"].get("backbone", "resnet18"), emb.get("layers")
    # embed.layers: tapped stages (the resolved list, as the fingerprint records it) or final
    what = (f"`{backbone}` stages {', '.join(f'`{n}`' for n in layers)} (each average- and "
            f"max-pooled, `embed.layers`)" if layers else
            f"`{backbone}` without its classification head")
    return [
        "## Method",
        f"- Features: {what}, weights `{params['embed']['weights']}`, {params['embed']['image_size']} px "
        f"greyscale → {emb.get('feature_dim', 'n/a')}-d (fingerprint "
        f"`{emb.get('fingerprint', 'see metrics/embed')}`).",
        f"- Classifier: `{t['model']}` (C={t['C']}, class weight {t['class_weight']}, "
        f"calibration `{t.get('calibration', 'none')}`); baseline on labels only; semi-supervised "
        f"adds pseudo-labels weighted by `{t['pseudo_weighting']}` × {t['pseudo_weight_scale']}.",
    ]


def _delta_text(dl: dict, key: str, pct: bool) -> str:
    delta = dl.get(key)
    dtxt = "n/a" if delta is None else (f"{100 * delta:+.1f} pts" if pct else f"{delta:+.3f}")
    if f"{key}_ci_low" in dl:
        dtxt += f" ({dl[f'{key}_ci_low']:+.3f}–{dl[f'{key}_ci_high']:+.3f})"
    return dtxt


def _performance(metrics: dict, pos: str) -> list[str]:
    ev = metrics.get("evaluate", {})
    b, s, dl = ev.get("baseline", {}), ev.get("semi_supervised", {}), ev.get("delta", {})
    lines = [
        "## Performance on the held-out test set (95 % CI)",
        "",
        f"Test images: {ev.get('n_test', 'n/a')}.",
        "",
        "| metric | baseline | semi-supervised | difference |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {_fmt_ci(b, key, pct)} | {_fmt_ci(s, key, pct)} | {_delta_text(dl, key, pct)} |"
              for name, key, pct in PERFORMANCE_ROWS]
    lines.append(f"| false negatives (missed {pos}) | {b.get('fn', 'n/a')} | {s.get('fn', 'n/a')} | |")
    thr = fmt_scores(b.get("threshold", float("nan")), s.get("threshold", float("nan")))
    lines.append(f"| threshold (a score at or above it: predicted {pos}) | {thr[0]} | {thr[1]} | |")
    return lines


TRIAGE_MODELS = (("semi_supervised", "semi-supervised"), ("baseline", "baseline"),
                 ("finetuned", "finetuned"))
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _triage_targets(block: dict) -> list[tuple[str, float]]:
    """``[("s90", 0.90), ...]`` of one model's ``triage`` metrics, by target."""
    keys = [k for k in block if k[:1] == "s" and k[1:].isdigit()]
    return sorted(((k, int(k[1:]) / 100) for k in keys), key=lambda kt: kt[1])


def _span(m: dict, key: str, pct: bool) -> str:
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if lo is None or hi is None:
        return ""
    return f"{100 * lo:.1f}–{100 * hi:.1f} %" if pct else f"{lo:.1f}–{hi:.1f}"


def _triage_cell(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None:
        return "n/a"
    span = _span(m, key, pct=key != "missed")
    text = f"{v}" if key == "missed" else f"{100 * v:.1f} %"
    return text + (f" [{span}]" if span else "")


def _triage(metrics: dict, pos: str) -> list[str]:
    """The triage KPI (evaluate's ``<model>.triage.s90|s95|s98``): per target, how many test
    images a reader could set aside and how many positives they would miss, with CIs."""
    ev = metrics.get("evaluate", {})
    models = [(key, label) for key, label in TRIAGE_MODELS if ev.get(key, {}).get("triage")]
    if not models:
        return []
    n = len(_triage_targets(ev[models[0][0]]["triage"]))
    words = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    lines = [f"## Triage at {words} sensitivity target{'' if n == 1 else 's'} (held-out test set)",
             "",
             f"Each threshold reaches its target sensitivity on out-of-fold predictions of the "
             f"labelled set (never on test). Below it an image is predicted not {pos}: a reader "
             f"could set it aside. *Set aside* is the share of test images below the threshold; "
             f"*missed* the images of class {pos} among them."]
    head, *_ = models[0]
    first = ev[head]
    n_test, n_pos = ev.get("n_test"), None
    if first.get("tp") is not None and first.get("fn") is not None:
        n_pos = first["tp"] + first["fn"]
    if n_test and n_pos is not None:
        lines[-1] += (f" Both depend on the test set's prevalence ({plural(n_pos, 'image')} of "
                      f"class {pos} among {n_test}, {_pct(n_pos / n_test)}): where {pos} is rarer, "
                      f"a larger share can be set aside.")
    lines += ["", "CIs in brackets: Wilson intervals at `evaluate.ci_level` (for *missed*: "
                 f"the interval of missed / test images of class {pos}, times their number); "
                 "they cover the test sample, not the threshold's own uncertainty."]
    lines += ["", f"The {dict(models)[head]} model:", ""]
    for key, target in _triage_targets(first["triage"]):
        m = first["triage"][key]
        missed = m.get("missed")
        if m.get("set_aside") is None or missed is None:
            continue
        aside_ci, missed_ci = _span(m, "set_aside", True), _span(m, "missed", False)
        sens = m.get("sensitivity")
        below = ("" if sens is None else f"; test sensitivity {_pct(sens, target)}"
                 + (", below the target" if sens < target else ""))
        lines.append(f"- At the {target:.2f} target a reader could set aside "
                     f"{_pct(m['set_aside'])} of images" + (f" (CI {aside_ci})" if aside_ci else "")
                     + f" and would miss {plural(int(missed), pos)}"
                     + (f" (CI {missed_ci})" if missed_ci else "") + below + ".")
    lines += ["", "| model | target | threshold | test sensitivity [CI] | set aside [CI] | "
              f"missed positives ({pos}) [CI] |", "|---|---|---|---|---|---|"]
    for key, label in models:
        block = ev[key]["triage"]
        for k, target in _triage_targets(block):
            m = block[k]
            thr = fmt_score(m["threshold"]) if m.get("threshold") is not None else "n/a"
            lines.append(f"| {label} | {target:.2f} | {thr} | {_triage_cell(m, 'sensitivity')} | "
                         f"{_triage_cell(m, 'set_aside')} | {_triage_cell(m, 'missed')} |")
    return lines


def _failure_modes(pos: str, errors: pd.DataFrame, threshold: float | None,
                   groups: Groups) -> list[str]:
    n_fn = int((errors["kind"] == "false negative").sum()) if len(errors) else 0
    fn = errors[errors["kind"] == "false negative"] if len(errors) else errors
    lines = [
        "## Known failure modes (error analysis of the semi-supervised model)",
        f"- {plural(n_fn, 'missed image')} of class **{pos}** on test (false "
        f"{'negative' if n_fn == 1 else 'negatives'}; see `reports/errors.html`, false negatives "
        "first, with their nearest labelled neighbours).",
    ]
    if n_fn:
        top = fn["cluster"].value_counts().head(3)
        where = ", ".join(f"{int(c) if c >= 0 else 'none (outliers)'} ({plural(int(n), 'image')})"
                          for c, n in top.items())
        of = f" of {groups.n}" if groups.n else ""
        by = CLUSTER_METHODS.get(groups.method or "", groups.method or "clustering")
        med = fn["proba"].median()
        if threshold is not None:
            m, t = fmt_scores(med, threshold)
            score = f"median score of the missed images {m} against the threshold {t}"
        else:
            score = f"median score of the missed images {fmt_score(med)}"
        lines.append(f"- The missed images fall most often in similar-image groups {where}{of} "
                     f"(groups of visually similar images, {by} on the embeddings; not diagnostic "
                     f"categories); {score}.")
    return lines


def render_model_card(params: dict, metrics: dict, errors: pd.DataFrame, *,
                      versions: Versions | None = None, groups: Groups | None = None) -> str:
    """Markdown model card from params and the metrics files of every stage. ``versions``:
    the model files' hashes and the package version (:func:`read_versions`); ``groups``: how
    the clusters are named (count and method)."""
    threshold = metrics.get("evaluate", {}).get("semi_supervised", {}).get("threshold")
    sections = [_sensitivity_status(params, metrics), _version(params, metrics, versions),
                _intended_use(params), _data_and_provenance(params, metrics),
                _method(params, metrics), _performance(metrics, params["data"]["positive_class"]),
                _triage(metrics, params["data"]["positive_class"]),
                _failure_modes(params["data"]["positive_class"], errors, threshold, groups or Groups()),
                LIMITATIONS, ETHICS, MONITORING]
    sections = [sec for sec in sections if sec]
    lines = _card_title()
    for section in sections:
        lines += ["", *section]
    return "\n".join(lines) + "\n"
