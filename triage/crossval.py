"""Leak-free cross-validation of the whole semi-supervised chain on the labelled set.

Repeated stratified K-fold over the labelled images. In each fold the held-out labelled
images are removed entirely: their labels are hidden *and* their images are not put in
the unlabelled pool (the test images of the real pipeline never enter the pool either, so
a fold mirrors it). Everything that can learn is refitted inside the fold from the
training labels + the pool only: the clusterer (scaler, PCA, KMeans/GMM/HDBSCAN) when the
strategy uses clusters, the pseudo-labeller (its own scaler/PCA, prior estimate,
calibration, rounds), and both classifiers (``train.*`` via ``triage.models``). Held-out
ROC-AUC is scored for the labelled-only baseline and the semi-supervised model; each
model's mean and the paired per-fold delta get a t-interval with the Nadeau & Bengio
(2003) correction for the overlap of training sets across folds (variance
s²·(1/J + n_test/n_train) instead of s²/J: the folds are not independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score

from .models import fit_semi_supervised, fit_weighted, make_classifier, positive_proba, pseudo_weights
from .progress import progress
from .pseudo import labeller_for, pseudo_label_quality, run_strategy
from .splits import repeated_kfold


def fold_splits(y: np.ndarray, folds: int, repeats: int, seed: int, groups=None):
    """(train index, held-out index) pairs of a repeated stratified K-fold (clamped so each
    class has at least one point per fold) that keeps each split group on one side."""
    return repeated_kfold(y, folds, repeats, seed, groups)


def mean_ci(values, level: float = 0.95, test_train_ratio: float | None = None) -> dict:
    """Mean and t-interval over folds; with ``test_train_ratio`` the Nadeau-Bengio corrected
    variance (1/J + n_test/n_train)·s² replaces s²/J. Also a two-sided p-value for mean = 0."""
    v = np.asarray(values, float)
    j = len(v)
    mean = float(v.mean()) if j else float("nan")
    if j < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan"),
                "std": float("nan"), "p_value": float("nan")}
    s2 = float(v.var(ddof=1))
    var = s2 * ((1 / j + test_train_ratio) if test_train_ratio is not None else 1 / j)
    se = np.sqrt(var)
    t = stats.t.ppf(0.5 + level / 2, j - 1)
    p = float(2 * stats.t.sf(abs(mean) / se, j - 1)) if se > 0 else (0.0 if mean else 1.0)
    return {"mean": mean, "ci_low": float(mean - t * se), "ci_high": float(mean + t * se),
            "std": float(np.sqrt(s2)), "p_value": p}


def cluster_for_fold(cluster_params: dict, X_fit: np.ndarray):
    from .cluster import make_clusterer

    return make_clusterer(cluster_params).fit(X_fit)


@dataclass(frozen=True)
class FoldPseudoLabels:
    """A fold's pseudo-labels: the accepted rows (``PSEUDO_COLUMNS``) and, aligned with
    them, their pool vectors, labels and training sample weights."""

    rows: pd.DataFrame
    X: np.ndarray
    y: np.ndarray
    weights: np.ndarray


def pool_outside(groups_pool, held_out_groups) -> np.ndarray | slice:
    """Pool rows a fold may use: none in a split group of a held-out labelled image (a
    near-copy of it would carry it into training as a pseudo-label). ``slice(None)``: all."""
    if groups_pool is None or held_out_groups is None:
        return slice(None)
    return ~np.isin(np.asarray(groups_pool, dtype=object), np.asarray(held_out_groups, dtype=object))


def fold_pseudo_labels(params: dict, positive: str, X_lab: np.ndarray, y_lab: np.ndarray,
                       ids_pool: np.ndarray, X_pool: np.ndarray,
                       groups_lab=None) -> FoldPseudoLabels:
    """Pseudo-labels made from these labels + the pool only: the clusterer (when the
    strategy or HDBSCAN noise needs clusters) and the pseudo-labeller are refitted here.

    Anything scored out of fold must get its pseudo-labels from this with the fold's
    training labels, never from the pipeline's pseudo-labels (made with every label).
    """
    p, t = params["pseudo"], params["train"]
    pool_clusters = lab_clusters = None
    if labeller_for(p["strategy"]).uses_clusters or params["cluster"]["method"] == "hdbscan":
        model = cluster_for_fold(params["cluster"], np.concatenate([X_lab, X_pool]))
        lab_clusters, pool_clusters = model.labels_[: len(X_lab)], model.labels_[len(X_lab):]
    pseudo = run_strategy(p, positive, ids_pool, X_pool, X_lab, y_lab, pool_clusters,
                          lab_clusters, groups_lab,
                          backend=params["cluster"].get("backend", "sklearn"))
    where = pd.Series(np.arange(len(ids_pool)), index=ids_pool)
    X_ps = X_pool[where.loc[pseudo["id"]].to_numpy()] if len(pseudo) else X_pool[:0]
    w_ps = pseudo_weights(pseudo["confidence"].to_numpy(), t["pseudo_weighting"],
                          t["pseudo_weight_scale"])
    return FoldPseudoLabels(pseudo, X_ps, pseudo["label"].to_numpy(dtype=object), w_ps)


def crossval_semisup(rows: pd.DataFrame, X: np.ndarray, params: dict, positive: str,
                     folds: int, repeats: int, seed: int, level: float = 0.95,
                     truth: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """Per-fold records and the summary (baseline / semi_supervised / delta ROC-AUC).

    ``rows`` has id, split, label aligned with ``X``; only ``labeled`` and ``unlabeled``
    rows are used (test rows are ignored: they never enter a fold or the pool).
    """
    t = params["train"]
    lab = (rows["split"] == "labeled").to_numpy()
    pool = (rows["split"] == "unlabeled").to_numpy()
    X_lab, y_lab = X[lab], rows.loc[lab, "label"].to_numpy(dtype=object)
    ids_lab = rows.loc[lab, "id"].to_numpy(dtype=object)
    X_pool, ids_pool = X[pool], rows.loc[pool, "id"].to_numpy(dtype=object)
    groups = rows["group"].to_numpy(dtype=object) if "group" in rows else None
    groups_lab = None if groups is None else groups[lab]
    groups_pool = None if groups is None else groups[pool]
    pipe = make_classifier(t["model"], t["C"], t["class_weight"], t["seed"], t["calibration"])
    splits, k = fold_splits((y_lab == positive).astype(int), folds, repeats, seed, groups_lab)
    classes = sorted(set(y_lab.tolist()))
    records = []
    for f, (tr, va) in enumerate(progress(splits, total=len(splits), desc="crossval",
                                          unit="fold")):
        keep = pool_outside(groups_pool, None if groups_lab is None else groups_lab[va])
        fold = fold_pseudo_labels(params, positive, X_lab[tr], y_lab[tr], ids_pool[keep],
                                  X_pool[keep], None if groups_lab is None else groups_lab[tr])
        pseudo = fold.rows
        # Guard: a pseudo-label may only name a pool image, never a labelled one.
        if not set(pseudo["id"]).isdisjoint(ids_lab):
            raise AssertionError("cross-validation leak: a labelled image was pseudo-labelled")
        base = fit_weighted(pipe, X_lab[tr], y_lab[tr])
        semi = fit_semi_supervised(pipe, X_lab[tr], y_lab[tr], fold.X, fold.y, fold.weights)
        y_va = (y_lab[va] == positive).astype(int)
        rec = {"fold": f, "repeat": f // k, "n_train": len(tr), "n_heldout": len(va),
               "n_pseudo": len(pseudo),
               "baseline": float(roc_auc_score(y_va, positive_proba(base, X_lab[va], positive))),
               "semi_supervised": float(roc_auc_score(y_va, positive_proba(semi, X_lab[va],
                                                                           positive)))}
        if truth is not None and len(pseudo):
            q = pseudo_label_quality(pseudo, truth, classes)
            rec["pseudo_accuracy"] = q.get("accuracy", float("nan"))
        records.append(rec)
    per_fold = pd.DataFrame(records)
    per_fold["delta"] = per_fold["semi_supervised"] - per_fold["baseline"]
    ratio = float(per_fold["n_heldout"].mean() / per_fold["n_train"].mean())
    # every interval is corrected for the overlap of training sets (Nadeau & Bengio 2003):
    # fold scores of overlapping folds are correlated, so plain s²/J is too narrow
    summary = {
        "baseline": mean_ci(per_fold["baseline"], level, test_train_ratio=ratio),
        "semi_supervised": mean_ci(per_fold["semi_supervised"], level, test_train_ratio=ratio),
        # paired delta
        "delta": mean_ci(per_fold["delta"], level, test_train_ratio=ratio),
        "n_folds": int(len(per_fold)), "folds": int(k), "repeats": int(repeats),
        "n_pseudo_mean": float(per_fold["n_pseudo"].mean()),
    }
    summary["delta"]["naive_ci_low"], summary["delta"]["naive_ci_high"] = (
        lambda d: (d["ci_low"], d["ci_high"]))(mean_ci(per_fold["delta"], level))
    if "pseudo_accuracy" in per_fold:
        summary["pseudo_accuracy_mean"] = float(per_fold["pseudo_accuracy"].mean())
    return per_fold, summary
