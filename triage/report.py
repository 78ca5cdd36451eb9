"""Error analysis page (``reports/errors.html``) and model card (``reports/model_card.md``).

Both are regenerated on every run from the pipeline's own outputs, so they cannot drift
from the metrics. Deterministic (no timestamps) so DVC hashes stay stable.
"""

from __future__ import annotations

from html import escape

import numpy as np
import pandas as pd

from .canonical import snap
from .pages import PAGE_END, page_head, thumbnail_html

MAX_ERRORS = 60       # error cards shown per kind (FN, FP); the parquet keeps them all
N_NEIGHBOURS = 3


def nearest_labelled(X_query: np.ndarray, X_labelled: np.ndarray, k: int = N_NEIGHBOURS) -> np.ndarray:
    """Indices of the k most cosine-similar labelled vectors for each query row."""
    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    # snapped per row (triage.canonical): a BLAS product; equal similarities must tie
    # exactly so the stable sort, not rounding noise, orders them
    sims = snap(unit(X_query.astype(np.float64)) @ unit(X_labelled.astype(np.float64)).T, axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order


def error_table(pred: pd.DataFrame, rows: pd.DataFrame, X: np.ndarray, clusters: pd.Series,
                positive: str, threshold: float) -> pd.DataFrame:
    """False negatives then false positives on test, with cluster and labelled neighbours.

    ``pred``: id, label, proba for one model on test; ``rows``: embedding rows (id, split,
    label, path) aligned with ``X``; ``clusters``: cluster id by image id.
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
        nn = nearest_labelled(q, X[lab])
        err["neighbours"] = [[(rows["path"].iloc[lab[j]], rows["label"].iloc[lab[j]])
                              for j in row] for row in nn]
    else:
        err["neighbours"] = [[] for _ in range(len(err))]
    err["cluster"] = err["id"].map(clusters).astype("Int64")
    err["path"] = err["id"].map(rows.drop_duplicates("id").set_index("id")["path"])
    return err.reset_index(drop=True)


def _error_card(r, kind: str, positive: str) -> str:
    """One error: its thumbnail, probability, truth, cluster, path and labelled neighbours."""
    nbrs = "".join(f"<div class='nb'>{thumbnail_html(p, 48, sized=True)}<span>{escape(str(lbl))}</span></div>"
                   for p, lbl in r["neighbours"])
    cluster = "—" if pd.isna(r["cluster"]) else int(r["cluster"])
    return (f"<div class='card err' data-kind='{kind}'>{thumbnail_html(r['path'], 96, sized=True)}"
            f"<div><b>P({escape(positive)}) = {r['proba']:.3f}</b></div>"
            f"<div>truth: {escape(str(r['label']))}; cluster {cluster}</div>"
            f"<div class='muted'>{escape(str(r['path']))}</div>"
            f"<div class='muted'>nearest labelled:</div><div class='nbs'>{nbrs}</div></div>")


def _model_errors(model: str, err: pd.DataFrame, threshold: float, positive: str,
                  max_errors: int) -> list[str]:
    """One model's section: false negatives, then false positives, at most max_errors each."""
    n_fn = int((err["kind"] == "false negative").sum())
    n_fp = int((err["kind"] == "false positive").sum())
    parts = [f"<h2 id='{escape(model)}'>{escape(model)} — threshold "
             f"{threshold:.4f}: {n_fn} false negatives, {n_fp} false positives</h2>"]
    for kind in ("false negative", "false positive"):
        sub = err[err["kind"] == kind]
        parts.append(f"<h3>{kind}s ({len(sub)})</h3>")
        if sub.empty:
            parts.append("<p class='muted'>none</p>")
            continue
        parts.append("<div class='grid'>")
        parts += [_error_card(r, kind, positive) for _, r in sub.head(max_errors).iterrows()]
        parts.append("</div>")
        if len(sub) > max_errors:
            parts.append(f"<p class='muted'>{len(sub) - max_errors} more not shown "
                         f"(all are in data/evaluate/test_predictions.parquet).</p>")
    return parts


def render_errors_html(errors: dict[str, pd.DataFrame], thresholds: dict[str, float],
                       n_test: int, positive: str, max_errors: int = MAX_ERRORS) -> str:
    """One section per model; within it false negatives first."""
    parts = [page_head("Error analysis"),
             "<h1>Error analysis on the held-out test set</h1>",
             f"<p class='warn'>Decision support for triage, not a diagnosis. Each card is an "
             f"error at the model's operating threshold; images are shown as the pipeline sees "
             f"them (greyscale). Positive class: <b>{escape(positive)}</b>; {n_test} test "
             f"images.</p>"]
    for model, err in errors.items():
        parts += _model_errors(model, err, thresholds[model], positive, max_errors)
    parts.append("<style>.nbs{display:flex;gap:4px}.nb{text-align:center;font-size:.9em}</style>")
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
)

MONITORING = (
    "## Monitoring to do",
    "- Re-run QC and compare intensity/shift statistics for every new batch; investigate "
    "any rise in quarantine rate or KS shift.",
    "- Track the positive rate of flagged images and the sensitivity on audited cases; "
    "re-set the threshold on fresh labelled data if either drifts.",
)


def _card_title() -> list[str]:
    return ["# Model card: semi-supervised image triage classifier",
            "",
            "*Generated by `dvc repro` (stage `report`) from params.yaml and the metrics files; "
            "do not edit by hand.*"]


def _intended_use(params: dict) -> list[str]:
    pos = params["data"]["positive_class"]
    target = params["evaluate"]["target_sensitivity"]
    return [
        "## Intended use",
        f"- **Triage aid**: ranks images so that those likely to show **{pos}** are read first. "
        "Every image still needs a qualified human reader; the output is never a diagnosis.",
        f"- Operating point chosen for sensitivity: the threshold reaches {target:.0%} "
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
        f"leaked test images: {qc.get('leaked_test_images', 'n/a')} "
        f"(policy `{params['qc']['leakage_policy']}`).",
        f"- Labelled training images: {tr.get('n_labeled', 'n/a')}; pseudo-labelled pool images "
        f"used: {tr.get('n_pseudo', 'n/a')} of {ps.get('n_pool', 'n/a')} "
        f"(strategy `{p['strategy']}`).",
    ]


def _method(params: dict, metrics: dict) -> list[str]:
    t, emb = params["train"], metrics.get("embed", {})
    return [
        "## Method",
        f"- Features: ResNet18 without its last layer, weights `{params['embed']['weights']}`, "
        f"{params['embed']['image_size']} px greyscale → 512-d (fingerprint "
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


def _performance(metrics: dict) -> list[str]:
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
    lines.append(f"| false negatives | {b.get('fn', 'n/a')} | {s.get('fn', 'n/a')} | |")
    lines.append(f"| threshold | {b.get('threshold', float('nan')):.4f} | "
                 f"{s.get('threshold', float('nan')):.4f} | |")
    return lines


def _failure_modes(pos: str, errors: pd.DataFrame) -> list[str]:
    n_fn = int((errors["kind"] == "false negative").sum()) if len(errors) else 0
    fn = errors[errors["kind"] == "false negative"] if len(errors) else errors
    lines = [
        "## Known failure modes (error analysis of the semi-supervised model)",
        f"- {n_fn} missed {pos} images on test (see `reports/errors.html`, false negatives "
        "first, with their nearest labelled neighbours).",
    ]
    if n_fn:
        top = fn["cluster"].value_counts().head(3)
        lines.append("- Missed cases concentrate in clusters " + ", ".join(
            f"{int(c)} ({n})" for c, n in top.items()) + "; median P(" + pos +
            f") of misses {fn['proba'].median():.3f}.")
    return lines


def render_model_card(params: dict, metrics: dict, errors: pd.DataFrame) -> str:
    """Markdown model card from params and the metrics files of every stage."""
    sections = [_intended_use(params), _data_and_provenance(params, metrics),
                _method(params, metrics), _performance(metrics),
                _failure_modes(params["data"]["positive_class"], errors),
                LIMITATIONS, ETHICS, MONITORING]
    lines = _card_title()
    for section in sections:
        lines += ["", *section]
    return "\n".join(lines) + "\n"
