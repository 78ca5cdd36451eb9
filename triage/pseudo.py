"""Pseudo-labelling strategies for the unlabelled pool.

Every strategy returns one row per *accepted* pool image: id, label, confidence,
strategy. Rejected images are simply not pseudo-labelled (they stay unlabelled); the
stage reports coverage so nothing disappears unnoticed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

PSEUDO_COLUMNS = ["id", "label", "confidence", "strategy"]


def _balance(accepted: pd.DataFrame) -> pd.DataFrame:
    """Keep the same number per class (the most confident), so one class cannot swamp training."""
    if accepted.empty:
        return accepted
    n = accepted.groupby("label").size()
    if len(n) < 2:
        return accepted.iloc[0:0]
    keep = int(n.min())
    return (accepted.sort_values(["confidence", "id"], ascending=[False, True])
            .groupby("label", sort=True).head(keep))


class ClusterVotePseudoLabeler:
    """Label a pool image with the majority label of the labelled points in its cluster.

    Only clusters with at least ``min_support`` labelled points and purity ≥
    ``min_purity`` vote. Confidence is the Laplace-smoothed purity, so a cluster backed by
    3/3 labels (0.8) counts less than one backed by 30/30 (0.97).
    """

    name = "cluster_vote"

    def __init__(self, min_purity: float = 0.8, min_support: int = 3, balance_classes: bool = False):
        self.min_purity, self.min_support = min_purity, min_support
        self.balance_classes = balance_classes

    def fit_predict(self, pool_ids, pool_clusters, labeled_clusters, labeled_y) -> pd.DataFrame:
        lab = pd.DataFrame({"cluster": np.asarray(labeled_clusters), "y": np.asarray(labeled_y)})
        votes = {}
        for c, g in lab.groupby("cluster"):
            counts = g["y"].value_counts()
            top = counts.index[0] if counts.iloc[0] != counts.iloc[-1] or len(counts) == 1 else None
            n = len(g)
            purity = counts.iloc[0] / n
            if top is None or n < self.min_support or purity < self.min_purity:
                continue
            votes[c] = (top, (counts.iloc[0] + 1) / (n + 2))
        rows = [(i, *votes[c]) for i, c in zip(pool_ids, pool_clusters) if c in votes]
        out = pd.DataFrame(rows, columns=["id", "label", "confidence"])
        out["strategy"] = self.name
        if self.balance_classes:
            out = _balance(out)
        return out[PSEUDO_COLUMNS].sort_values("id").reset_index(drop=True)


class ConfidencePseudoLabeler:
    """Accept pool images a classifier fitted on the labelled set is confident about."""

    name = "confidence"

    def __init__(self, threshold: float = 0.9, C: float = 0.1, balance_classes: bool = False,
                 random_state: int = 0):
        self.threshold, self.C = threshold, C
        self.balance_classes, self.random_state = balance_classes, random_state

    def fit_predict(self, pool_ids, X_pool, X_labeled, labeled_y) -> pd.DataFrame:
        clf = make_pipeline(StandardScaler(), LogisticRegression(
            C=self.C, class_weight="balanced", max_iter=5000, random_state=self.random_state))
        clf.fit(X_labeled, labeled_y)
        proba = clf.predict_proba(X_pool) if len(X_pool) else np.zeros((0, len(clf.classes_)))
        best = proba.argmax(axis=1) if len(proba) else np.zeros(0, int)
        conf = proba.max(axis=1) if len(proba) else np.zeros(0)
        keep = conf >= self.threshold
        out = pd.DataFrame({"id": np.asarray(pool_ids)[keep],
                            "label": clf.classes_[best[keep]],
                            "confidence": conf[keep]})
        out["strategy"] = self.name
        if self.balance_classes:
            out = _balance(out)
        return out[PSEUDO_COLUMNS].sort_values("id").reset_index(drop=True)


def pseudo_label_quality(pseudo: pd.DataFrame, truth: pd.DataFrame, classes: list[str]) -> dict:
    """Accuracy and per-class precision of accepted pseudo-labels against hidden truth (id, label)."""
    if truth.empty or pseudo.empty:
        return {}
    merged = pseudo.merge(truth[["id", "label"]].rename(columns={"label": "truth"}), on="id")
    if merged.empty:
        return {}
    out = {"accuracy": float((merged["label"] == merged["truth"]).mean()),
           "n_with_truth": int(len(merged))}
    for c in classes:
        sel = merged[merged["label"] == c]
        if len(sel):
            out[f"precision/{c}"] = float((sel["truth"] == c).mean())
        n_true = int((truth["label"] == c).sum())
        if n_true:
            out[f"recall/{c}"] = float(((merged["label"] == c) & (merged["truth"] == c)).sum() / n_true)
    return out
