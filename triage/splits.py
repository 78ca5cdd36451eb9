"""Folds that keep a split group on one side: the one place the pipeline's CV folds are made.

A *split group* is a set of images that must never straddle a training part and its
held-out part: exact copies, near-duplicates (pHash, ``qc.near_dup_hamming``) and the
images of one patient, joined transitively. QC computes it (``group`` column of
``data/qc/manifest_clean.parquet``; an image alone in its group has its own id). A model
scored on a near-copy of one of its training images is scored on its training data, so
out-of-fold thresholds, crossval deltas and pseudo-label calibration would all be
optimistic.

Every K-fold of the chain comes from here (train's out-of-fold scores, crossval,
pseudo_label's calibration, finetune). When every group is a single image the folds are
exactly scikit-learn's ``StratifiedKFold`` / ``RepeatedStratifiedKFold`` ones, so a set
without duplicates gives the results it always gave; otherwise ``StratifiedGroupKFold``
(shuffled, seeded; a repeat r uses seed + r).

numpy and scikit-learn only: stages that read vectors import it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedGroupKFold, StratifiedKFold

CLEAN_MANIFEST = Path("data/qc/manifest_clean.parquet")


def _singletons(groups) -> bool:
    return groups is None or len(np.unique(np.asarray(groups, dtype=object))) == len(groups)


def max_folds(y, groups=None) -> int:
    """The most folds that leave each class in every held-out part: the number of
    distinct groups holding the rarest class (the image count without groups)."""
    y = np.asarray(y)
    if _singletons(groups):
        return int(np.unique(y, return_counts=True)[1].min())
    g = np.asarray(groups, dtype=object)
    return int(min(len(set(g[y == c])) for c in np.unique(y)))


def kfold(y, folds: int, seed: int, groups=None) -> tuple[list, int]:
    """(train index, held-out index) pairs of a stratified K-fold that keeps each group
    on one side, and the fold count used (clamped to ``[2, max_folds]``)."""
    y = np.asarray(y)
    k = max(2, min(folds, max_folds(y, groups)))
    if _singletons(groups):
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y)), k
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, np.asarray(groups, dtype=object))), k


def repeated_kfold(y, folds: int, repeats: int, seed: int, groups=None) -> tuple[list, int]:
    """``repeats`` group-keeping stratified K-folds, one after the other."""
    y = np.asarray(y)
    k = max(2, min(folds, max_folds(y, groups)))
    if _singletons(groups):
        rskf = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
        return list(rskf.split(np.zeros(len(y)), y)), k
    splits = []
    for r in range(repeats):
        splits += kfold(y, k, seed + r, groups)[0]
    return splits, k


def groups_for(ids, manifest: str | Path = CLEAN_MANIFEST) -> np.ndarray:
    """The split group of each id, from QC's clean manifest (an id QC did not group, or a
    manifest without the column, is its own group)."""
    import pyarrow.parquet as pq

    ids = np.asarray(ids, dtype=object)
    path = Path(manifest)
    if not path.is_file() or "group" not in pq.read_schema(path).names:
        return ids.copy()
    table = pq.read_table(path, columns=["id", "group"]).to_pydict()
    lookup = dict(zip(table["id"], table["group"]))
    return np.array([lookup.get(i) or i for i in ids], dtype=object)
