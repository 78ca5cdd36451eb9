"""Active learning: which unlabelled images should the radiologists label next.

Two ingredients, so a batch is both informative and not redundant:

* **uncertainty** of the semi-supervised model on each pool image: ``margin``
  (1 - |P(pos) - P(neg)|, 1 = coin flip) or ``entropy`` (binary entropy in bits);
* **diversity** in embedding space (StandardScaler → PCA fitted on labelled + pool):
  ``kcenter`` = uncertainty-weighted k-center greedy: the next image maximises
  ``uncertainty × distance to the nearest labelled or already selected image``, so a
  near-copy of a chosen image (distance ≈ 0) is never chosen while anything else is left;
  ``cluster`` = round-robin over the pool clusters (most uncertain first in each);
  ``none`` = plain top-uncertainty.

The nearest-neighbour searches (each candidate's distance to the labelled set, the pool's
nearest-other distances) are found by ``cluster.backend`` (triage.neighbours: NumPy, or
certified FAISS candidates re-ranked with the same float64 distances, so the same bits);
the greedy update against one new centre is a single vector operation and stays NumPy.

The output rows (id, path, score, why) carry no probability or predicted class: the
annotators should label blind to the model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from .canonical import canonical_reducer
from .neighbours import check_backend, exact_knn

TO_LABEL_COLUMNS = ["id", "path", "score", "why"]


def uncertainty(p: np.ndarray, kind: str = "margin") -> np.ndarray:
    """Uncertainty in [0, 1] of binary probabilities ``p`` (1 = maximally unsure)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    if kind == "margin":
        return 1.0 - np.abs(2.0 * p - 1.0)
    if kind == "entropy":
        return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    raise ValueError(f"unknown select.uncertainty {kind!r}")


def embed_space(X_fit: np.ndarray, n_components: int, seed: int = 0) -> Pipeline:
    n = int(min(n_components, X_fit.shape[0], X_fit.shape[1]))
    return canonical_reducer(n, seed).fit(X_fit)


def nearest_fixed_distance(Z: np.ndarray, Z_fixed: np.ndarray,
                           backend: str = "sklearn") -> np.ndarray:
    """Distance of each row of ``Z`` to its nearest row of ``Z_fixed`` (float64).

    ``sklearn``: every pair in blocks of 2,048 fixed rows (the committed code). ``faiss``: a
    1-NN search (triage.neighbours.exact_knn) whose distance is the same float64 sum, so
    the same bits (sqrt is monotone and correctly rounded: sqrt of the min = min of sqrt)."""
    if check_backend(backend) == "faiss":
        return np.sqrt(exact_knn(Z, Z_fixed, 1, backend)[0][:, 0])
    d = np.full(len(Z), np.inf)
    for start in range(0, len(Z_fixed), 2048):
        block = np.asarray(Z_fixed[start:start + 2048], dtype=np.float64)
        d = np.minimum(d, np.sqrt(((Z[:, None, :] - block[None]) ** 2).sum(-1)).min(1))
    return d


def kcenter_greedy(Z: np.ndarray, k: int, weights: np.ndarray | None = None,
                   Z_fixed: np.ndarray | None = None, backend: str = "sklearn",
                   d_fixed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy (weighted) k-center: indices of ``k`` rows of ``Z`` and their distances.

    Each step picks ``argmax weight_i × d_i`` where ``d_i`` is the distance of row i to
    the nearest already chosen row or row of ``Z_fixed`` (the labelled images). Without
    ``Z_fixed`` (cold start) the first pick is the highest weight (ties: the point farthest
    from the mean), and ``d`` is then reset to the distances from that pick — the
    placeholder start values are not distances, and keeping them would cap every later
    ``d`` at ~1 and degenerate the selection to top-weight. Deterministic: ties go to the
    lowest index. Returns (indices, d at pick time; NaN for a cold-start first pick).
    ``backend`` (``cluster.backend``) finds each row's nearest ``Z_fixed`` row
    (:func:`nearest_fixed_distance`; ``d_fixed``: those distances, already computed).
    """
    Z = np.asarray(Z, dtype=np.float64)
    n = len(Z)
    k = min(int(k), n)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    has_fixed = Z_fixed is not None and len(Z_fixed) > 0
    if has_fixed:
        d = (nearest_fixed_distance(Z, Z_fixed, backend) if d_fixed is None
             else np.asarray(d_fixed, dtype=np.float64).copy())
    else:
        d = np.linalg.norm(Z - Z.mean(0), axis=1)
        d = d / max(d.max(), 1e-12) * 1e-6 + 1.0  # first pick: highest weight, ties far out
    chosen, at_pick = [], []
    taken = np.zeros(n, dtype=bool)
    for _ in range(k):
        score = np.where(taken, -np.inf, w * d)
        i = int(np.argmax(score))
        chosen.append(i)
        cold_first = not has_fixed and len(chosen) == 1
        at_pick.append(float("nan") if cold_first else float(d[i]))
        taken[i] = True
        d_i = np.linalg.norm(Z - Z[i], axis=1)
        # cold start: the start values were placeholders, the real distances begin here
        d = d_i if cold_first else np.minimum(d, d_i)
    return np.asarray(chosen, dtype=np.int64), np.asarray(at_pick)


def cluster_round_robin(u: np.ndarray, clusters: np.ndarray, k: int) -> np.ndarray:
    """Most uncertain image of each cluster in turn (clusters ordered by their top uncertainty)."""
    order = np.lexsort((np.arange(len(u)), -u))  # by uncertainty desc, then index
    queues: dict[int, list[int]] = {}
    for i in order:
        queues.setdefault(int(clusters[i]), []).append(int(i))
    ranked = sorted(queues, key=lambda c: (-u[queues[c][0]], c))
    out: list[int] = []
    while len(out) < min(k, len(u)):
        for c in ranked:
            if queues[c] and len(out) < k:
                out.append(queues[c].pop(0))
    return np.asarray(out, dtype=np.int64)


def select_batch(X_pool: np.ndarray, p_pool: np.ndarray, X_labeled: np.ndarray, *,
                 batch_size: int, uncertainty_kind: str = "margin", diversity: str = "kcenter",
                 candidates: int = 300, pca_components: int = 32,
                 clusters: np.ndarray | None = None, seed: int = 0,
                 space: Pipeline | None = None, backend: str = "sklearn") -> pd.DataFrame:
    """Rank pool images for annotation.

    Returns one row per selected image, in selection order: ``index`` (row of
    ``X_pool``), ``uncertainty``, ``distance`` (to the nearest labelled/selected image in
    the PCA space, in units of the pool's median nearest-labelled distance; NaN for
    ``none``/``cluster``), ``cluster`` (or -1), ``score`` (the selection score: uncertainty
    × relative distance for kcenter, uncertainty otherwise). ``space``: a fitted
    scaler+PCA (default: :func:`embed_space` on labelled + pool). ``backend``:
    ``cluster.backend``, the library of the kcenter nearest-labelled search.
    """
    n = len(X_pool)
    if n == 0:
        return pd.DataFrame(columns=["index", "uncertainty", "distance", "cluster", "score"])
    u = uncertainty(p_pool, uncertainty_kind)
    k = min(int(batch_size), n)
    cl = np.full(n, -1) if clusters is None else np.asarray(clusters)
    if diversity == "none":
        idx = np.lexsort((np.arange(n), -u))[:k]
        dist = np.full(k, np.nan)
        score = u[idx]
    elif diversity == "cluster":
        if clusters is None:
            raise ValueError("select.diversity=cluster needs the pool's cluster assignments")
        idx = cluster_round_robin(u, cl, k)
        dist = np.full(len(idx), np.nan)
        score = u[idx]
    elif diversity == "kcenter":
        if space is None:
            space = embed_space(np.concatenate([X_labeled, X_pool]), pca_components, seed)
        Z, Z_lab = space.transform(X_pool), space.transform(X_labeled) if len(X_labeled) else None
        cand = np.arange(n)
        if candidates and candidates < n:
            cand = np.sort(np.lexsort((np.arange(n), -u))[:max(candidates, k)])
        # scale distances by the typical pool→labelled distance so the score is readable
        ref = None
        if Z_lab is not None:
            if check_backend(backend) == "sklearn":  # the committed code, its bits
                ref = np.sqrt(((Z[cand][:, None, :] - Z_lab[None]) ** 2).sum(-1)).min(1)
            else:  # the same distances, searched once and reused as k-center's start
                ref = nearest_fixed_distance(Z[cand], Z_lab, backend)
            unit = float(np.median(ref)) or 1.0
        else:
            unit = 1.0
        picked, d = kcenter_greedy(Z[cand], k, weights=u[cand], Z_fixed=Z_lab, backend=backend,
                                   d_fixed=None if backend == "sklearn" else ref)
        idx = cand[picked]
        dist = d / unit
        score = u[idx] * np.nan_to_num(dist, nan=1.0)
    else:
        raise ValueError(f"unknown select.diversity {diversity!r}")
    return pd.DataFrame({"index": idx, "uncertainty": u[idx], "distance": dist,
                         "cluster": cl[idx].astype(int), "score": score})


def why_text(row, n_pool: int, u_rank: int, kind: str, diversity: str,
             cluster_info: dict | None = None) -> str:
    """Plain-language reason (no probability, no predicted class: annotators stay blind)."""
    parts = [f"model uncertain ({kind} uncertainty {row.uncertainty:.2f}, "
             f"#{u_rank} most uncertain of {n_pool})"]
    if diversity == "kcenter" and row.distance == row.distance:
        parts.append(f"unlike the labelled and other selected images (distance "
                     f"{row.distance:.2f}x the typical pool-to-labelled distance)")
    if row.cluster >= 0:
        extra = ""
        if cluster_info and int(row.cluster) in cluster_info:
            size, n_lab = cluster_info[int(row.cluster)]
            extra = f": {n_lab} labelled of {size}"
        parts.append(f"cluster {int(row.cluster)}{extra}")
    return "; ".join(parts)


def to_label_table(sel: pd.DataFrame, pool_rows: pd.DataFrame, u_all: np.ndarray, kind: str,
                   diversity: str, cluster_info: dict | None = None) -> pd.DataFrame:
    """The CSV handed to annotators: id, path, score, why — in selection order."""
    rank = np.empty(len(u_all), dtype=np.int64)
    rank[np.lexsort((np.arange(len(u_all)), -u_all))] = np.arange(1, len(u_all) + 1)
    rows = []
    for r in sel.itertuples(index=False):
        src = pool_rows.iloc[int(r.index)]
        rows.append({"id": src["id"], "path": src["path"], "score": round(float(r.score), 6),
                     "why": why_text(r, len(u_all), int(rank[int(r.index)]), kind, diversity,
                                     cluster_info)})
    return pd.DataFrame(rows, columns=TO_LABEL_COLUMNS)


def batch_stats(Z_sel: np.ndarray, Z_pool: np.ndarray, backend: str = "sklearn") -> dict:
    """Redundancy of a batch: min/median pairwise distance vs the pool's median NN distance
    (``backend``: ``cluster.backend``, the nearest-other search; the batch's own pairwise
    distances are all needed, a few hundred at most, and stay NumPy)."""
    out = {}
    if len(Z_sel) >= 2:
        D = np.sqrt(((Z_sel[:, None] - Z_sel[None]) ** 2).sum(-1))
        iu = np.triu_indices(len(Z_sel), 1)
        out["min_pairwise_distance"] = float(D[iu].min())
        out["median_pairwise_distance"] = float(np.median(D[iu]))
    sub = Z_pool[:: max(1, len(Z_pool) // 500)]
    if len(sub) >= 2:
        out["pool_median_nn_distance"] = float(np.median(nearest_other_distance(sub,
                                                                                backend=backend)))
    return out


def nearest_other_distance(Z: np.ndarray, block: int = 64, backend: str = "sklearn") -> np.ndarray:
    """Distance from each row to its nearest other row, in row blocks: the (n, n, d)
    difference array of one broadcast would be ~130 MB for 700 rows of 32 dimensions.
    Each distance is the same sum over d as the broadcast's, so the same bits. ``faiss``:
    the 2-NN of the rows among themselves (triage.neighbours.exact_knn, leave one out),
    the same float64 sums, so the same bits."""
    if check_backend(backend) == "faiss" and len(Z) >= 2:
        Z = np.asarray(Z, dtype=np.float64)
        return np.sqrt(exact_knn(Z, Z, 1, backend, leave_one_out=True)[0][:, 0])
    nearest = np.empty(len(Z))
    for start in range(0, len(Z), block):
        D = np.sqrt(((Z[start:start + block, None] - Z[None]) ** 2).sum(-1))
        rows = np.arange(len(D))
        D[rows, start + rows] = np.inf
        nearest[start:start + block] = D.min(1)
    return nearest
