"""Label audit of the labelled set: which given labels the out-of-fold model doubts most.

With ~100 labels one wrong label moves every number (the threshold, every metric), so the
labelled images are checked with confident learning (Northcutt et al. 2021, JAIR 70) as
implemented by ``cleanlab.filter.find_label_issues`` (nothing is re-implemented here).
Its input is the **baseline** model's out-of-fold P(positive) written by the train stage
(``data/models/oof_predictions.parquet``): each image scored by a model that never saw it
(nor, with split groups, any near-copy of it), trained on labels only, so no pseudo-label
made from a wrong label can vouch for it.

- ``flagged``: cleanlab's mask with ``audit.filter_by`` (its default
  ``prune_by_noise_rate``: the estimated number of errors per off-diagonal of the confident
  joint, the most confidently off examples first; with two classes it selects the same
  images as ``prune_by_class`` and ``both``).
- ``score``: ``1 - cleanlab.rank.get_label_quality_scores(method="self_confidence")``,
  i.e. 1 - P(given label) out of fold, in [0, 1]: **higher = more likely mislabelled**.
  For two classes cleanlab's other rankings (normalized margin, confidence-weighted
  entropy) order the images the same way.
- ``suggested_label``: the other class (the one a second reader should consider).

The audit only proposes: nothing is relabelled automatically (docs/active_learning.md).
numpy/pandas/cleanlab only (no torch): the stage reads probabilities, never images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .errors import PipelineError
from .params import check

COLUMNS = ["id", "path", "given_label", "suggested_label", "score"]  # to_review.csv contract
RANKED_BY = "self_confidence"
OOF_MODEL = "baseline"  # labels only: no pseudo-label feeds back into the audit


def negative_name(labels, positive: str) -> str:
    """The other class's name, or ``"not <positive>"`` when the labels hold several."""
    others = sorted({str(v) for v in labels if v != positive})
    return others[0] if len(others) == 1 else f"not {positive}"


def baseline_oof(oof: pd.DataFrame, model: str = OOF_MODEL) -> pd.DataFrame:
    """The rows of one model in the train stage's out-of-fold table (id, label, proba)."""
    missing = {"id", "model", "label", "proba"} - set(oof.columns)
    if missing:
        raise PipelineError(f"out-of-fold predictions lack columns {sorted(missing)} "
                            f"(run `dvc repro train`)")
    rows = oof[oof["model"] == model]
    if rows.empty:
        raise PipelineError(f"no out-of-fold predictions of model '{model}' "
                            f"(run `dvc repro train`)")
    return rows[["id", "label", "proba"]].reset_index(drop=True)


def audit_labels(ids, labels, proba, positive: str,
                 filter_by: str = "prune_by_noise_rate") -> pd.DataFrame:
    """Every audited image, most suspicious first: id, given_label, suggested_label,
    score (1 - P(given label), higher = more likely mislabelled) and flagged (cleanlab's
    ``find_label_issues`` with ``filter_by``). ``proba``: out-of-fold P(``positive``)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    check("audit.filter_by", filter_by)  # cleanlab's options (triage.params.SCHEMA)
    labels = np.asarray(labels, dtype=object)
    p = np.asarray(proba, dtype=np.float64)
    if not (len(labels) == len(p) == len(ids)):
        raise ValueError("ids, labels and proba must have the same length")
    y = (labels == positive).astype(int)
    if len(np.unique(y)) < 2:
        raise PipelineError(f"label audit needs labelled images of '{positive}' and of another "
                            f"class (got {sorted(set(labels.tolist()))})")
    negative = negative_name(labels, positive)
    pred_probs = np.column_stack([1.0 - p, p])
    # n_jobs=1: ~100 rows; no process pool, and the same result on any machine
    flagged = find_label_issues(y, pred_probs, filter_by=filter_by, n_jobs=1)
    quality = get_label_quality_scores(y, pred_probs, method=RANKED_BY)
    table = pd.DataFrame({
        "id": np.asarray(ids, dtype=object),
        "given_label": labels,
        "suggested_label": np.where(y == 1, negative, positive).astype(object),
        "score": np.round(1.0 - quality, 6),
        "flagged": np.asarray(flagged, dtype=bool),
    })
    # most suspicious first; equal scores in id order (the same file every run)
    return table.sort_values(["score", "id"], ascending=[False, True],
                             kind="stable").reset_index(drop=True)


def to_review(audit: pd.DataFrame, paths: pd.Series, max_rows: int) -> pd.DataFrame:
    """The flagged images, most suspicious first, at most ``max_rows``, in the
    to_review.csv columns; ``paths``: image path by id (the clean manifest)."""
    rows = audit[audit["flagged"]].head(max_rows).copy()
    rows["path"] = rows["id"].map(paths)
    return rows[COLUMNS].reset_index(drop=True)


def audit_stats(audit: pd.DataFrame, review: pd.DataFrame) -> dict[str, int]:
    """Counts for the metrics: n_audited, n_flagged, flagged/<given class>, n_to_review."""
    stats = {"n_audited": int(len(audit)), "n_flagged": int(audit["flagged"].sum()),
             "n_to_review": int(len(review))}
    for cls in sorted(set(audit["given_label"].astype(str))):
        stats[f"flagged/{cls}"] = int((audit["flagged"] & (audit["given_label"] == cls)).sum())
    return stats


def read_review(path) -> pd.DataFrame:
    """to_review.csv as written by the stage (text columns as text, score as a number)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"label audit not found: {path} (run `dvc repro audit`)")
    review = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(review.columns) != COLUMNS:
        raise PipelineError(f"{path}: columns {list(review.columns)}, expected {COLUMNS} "
                            f"(run `dvc repro audit`)")
    review["score"] = review["score"].astype(float)
    return review
