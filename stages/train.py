"""Stage `train`: labelled-only baseline and labelled + pseudo-labelled model, with thresholds.

Each model's operating threshold is set on out-of-fold scores of the labelled set to reach
evaluate.target_sensitivity, so the test set never influences it (and, for the
semi-supervised model, the pseudo-labels of each fold come from its training labels only).
"""
from pathlib import Path

import numpy as np
import pandas as pd

from triage.crossval import fold_pseudo_labels, pool_outside
from triage.io import open_live, read_parquet, run_stage, write_parquet
from triage.metrics import point_metrics, threshold_for_sensitivity
from triage.models import (
    fit_semi_supervised,
    fit_weighted,
    make_classifier,
    ood_reference,
    out_of_fold_proba,
    pseudo_weights,
    save_model,
)
from triage.params import load_params
from triage.splits import groups_for
from triage.store import read_embeddings

EMBEDDINGS = Path("data/features/embeddings.parquet")
PSEUDO = Path("data/pseudo/pseudo_labels.parquet")
MODELS = Path("data/models")


def main() -> None:
    params = load_params()
    t, positive = params["train"], params["data"]["positive_class"]
    target = params["evaluate"]["target_sensitivity"]
    rows, X, fingerprint = read_embeddings(EMBEDDINGS)
    lab = (rows["split"] == "labeled").to_numpy()
    X_lab, y_lab = X[lab], rows.loc[lab, "label"].to_numpy()
    pseudo = read_parquet(PSEUDO, "pseudo labels")
    index = pd.Series(np.arange(len(rows)), index=rows["id"])
    # Drop pseudo-labels whose id is not an unlabelled row (defensive against stale inputs).
    pseudo = pseudo[pseudo["id"].isin(rows.loc[rows["split"] == "unlabeled", "id"])]
    X_ps = X[index.loc[pseudo["id"]].to_numpy()] if len(pseudo) else X[:0]
    y_ps = pseudo["label"].to_numpy()
    w_ps = pseudo_weights(pseudo["confidence"].to_numpy(), t["pseudo_weighting"],
                          t["pseudo_weight_scale"])

    pipe = make_classifier(t["model"], t["C"], t["class_weight"], t["seed"], t["calibration"])
    fitted = {
        "baseline": fit_weighted(pipe, X_lab, y_lab),
        "semi_supervised": fit_semi_supervised(pipe, X_lab, y_lab, X_ps, y_ps, w_ps),
    }
    # Out-of-fold scores set each threshold. For the semi-supervised model the pool is
    # pseudo-labelled again inside every fold from that fold's training labels: the
    # pipeline's pseudo-labels were made with all labels and would leak the held-out ones.
    pool = (rows["split"] == "unlabeled").to_numpy()
    ids_pool, X_pool = rows.loc[pool, "id"].to_numpy(dtype=object), X[pool]

    # Folds keep each split group (near-duplicates, one patient) on one side (triage.splits).
    groups = groups_for(rows["id"])
    groups_lab, groups_pool = groups[lab], groups[pool]

    def pseudo_for_fold(tr):
        held_out = np.setdiff1d(np.arange(len(y_lab)), tr)
        keep = pool_outside(groups_pool, groups_lab[held_out])
        fold = fold_pseudo_labels(params, positive, X_lab[tr], y_lab[tr], ids_pool[keep],
                                  X_pool[keep], groups_lab[tr])
        return fold.X, fold.y, fold.weights

    oof = {
        "baseline": out_of_fold_proba(pipe, X_lab, y_lab, positive, t["cv_folds"], t["seed"],
                                      groups=groups_lab),
        "semi_supervised": out_of_fold_proba(pipe, X_lab, y_lab, positive, t["cv_folds"],
                                             t["seed"], pseudo_for_fold, groups=groups_lab),
    }
    y_bin = (y_lab == positive).astype(int)
    # The out-of-distribution reference served with both models: the training vectors
    # (labelled + pool) and the threshold of their own leave-one-out kNN distance
    # (triage.models.ood_reference; inference.ood_*).
    train_rows = rows["split"].isin(["labeled", "unlabeled"]).to_numpy()
    ood = ood_reference(X[train_rows], params["inference"]["ood_k"],
                        params["inference"]["ood_quantile"], params["cluster"]["backend"])
    oof_rows = []
    with open_live("train") as live:
        live.log_metric("n_labeled", int(lab.sum()), plot=False)
        live.log_metric("n_pseudo", int(len(pseudo)), plot=False)
        live.log_metric("ood/threshold", round(ood["threshold"], 6), plot=False)
        live.log_metric("ood/n_reference", int(len(ood["reference"])), plot=False)
        for name, model in fitted.items():
            threshold = threshold_for_sensitivity(y_bin, oof[name], target)
            m = point_metrics(y_bin, oof[name], threshold)
            save_model({"model": model, "name": name, "positive_class": positive,
                        "classes": [str(c) for c in model.classes_],
                        "threshold": float(threshold), "target_sensitivity": float(target),
                        "embedding_fingerprint": fingerprint.get("fingerprint", ""),
                        "n_labeled": int(lab.sum()),
                        "n_pseudo": int(len(pseudo)) if name == "semi_supervised" else 0,
                        "ood": ood},
                       MODELS / f"{name}.skops")
            live.log_metric(f"{name}/threshold", round(threshold, 6), plot=False)
            for key in ("roc_auc", "sensitivity", "specificity"):
                live.log_metric(f"{name}/oof_{key}", round(m[key], 6), plot=False)
            oof_rows.append(pd.DataFrame({"id": rows.loc[lab, "id"].to_numpy(), "model": name,
                                          "label": y_lab, "proba": oof[name]}))
    write_parquet(pd.concat(oof_rows, ignore_index=True), MODELS / "oof_predictions.parquet")


if __name__ == "__main__":
    run_stage(main)
