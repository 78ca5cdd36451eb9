"""Exact k nearest neighbours (squared L2) with scikit-learn or FAISS behind one switch.

``knn(query, reference, k, backend)`` returns ``(distances, indices)`` of shape
``(len(query), k)``, nearest first, distances squared Euclidean. ``backend="faiss"`` uses
an exact ``faiss.IndexFlatL2`` (no approximation, float32, a fixed thread count);
``"sklearn"`` uses ``NearestNeighbors(algorithm="brute")``. The two give the same index
sets up to ties and float32 rounding. FAISS is imported only when asked for.

Not wired into a stage yet (issue #19 item 3): the cluster stage's FAISS path lives in
triage.cluster (k-means + IndexFlatL2 assignment); label spreading's kNN graph, the
k-center selection (triage.select), the report's neighbours and drift still use their
own NumPy/scikit-learn code.
"""

from __future__ import annotations

import numpy as np

BACKENDS = ("sklearn", "faiss")
FAISS_THREADS = 1  # fixed: the same bits on any core count


def knn(query, reference, k: int, backend: str = "sklearn") -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest ``reference`` rows of each ``query`` row (squared L2)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    reference = np.asarray(reference)
    query = np.asarray(query)
    k = int(k)
    if not 1 <= k <= len(reference):
        raise ValueError(f"k={k} must be between 1 and the number of reference rows "
                         f"({len(reference)})")
    if backend == "faiss":
        import faiss

        faiss.omp_set_num_threads(FAISS_THREADS)
        ref32 = np.ascontiguousarray(reference, dtype=np.float32)
        index = faiss.IndexFlatL2(ref32.shape[1])
        index.add(ref32)
        dist, idx = index.search(np.ascontiguousarray(query, dtype=np.float32), k)
        return dist.astype(np.float64), idx.astype(np.int64)
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(reference)
    dist, idx = nn.kneighbors(query)
    return dist.astype(np.float64) ** 2, idx.astype(np.int64)
