"""The pipeline's nearest-neighbour searches, scikit-learn/NumPy or FAISS behind one switch.

``cluster.backend`` (``sklearn`` | ``faiss``) is that switch: the cluster stage's k-means
(triage.cluster) and every vector search below, used by label spreading's kNN graph
(triage.pseudo), the k-center selection (triage.select), the report's nearest labelled
images (triage.report) and the OOD check of train / inference / drift (triage.models).
FAISS is imported only when asked for.

``knn(query, reference, k, backend)`` is the raw search: squared L2, float32 in FAISS
(an exact ``IndexFlatL2``, no approximation) or ``NearestNeighbors(algorithm="brute")``.

The stages use the *exact* searches, whose results do not depend on the backend:

* :func:`exact_knn` — squared distances computed the pipeline's canonical way (float64
  differences, squares, a sum along the row: NumPy's fixed-order reduction, the same bits
  as triage.select's and triage.models' broadcasts), nearest first, ties to the lower
  index;
* :func:`cosine_knn` — the most cosine-similar rows, similarities snapped per query row
  (triage.canonical) and ordered by a stable sort, ties to the lower index.

With ``faiss`` FAISS proposes the ``k + MARGIN`` nearest candidates (float32, on
mean-centred copies: distances do not change under a shift, the float32 error does), the
candidates are re-ranked exactly as above, and the result is *certified*: a row is kept
only if every row FAISS did not propose is provably farther (or less similar) than the
k-th kept one, allowing FAISS's worst-case float32 error (:func:`_faiss_error`). Rows that
fail the certificate (ties or near-ties beyond the candidates, e.g. many exact duplicates)
are recomputed by brute force. So FAISS returns the same indices and the same distance
bits as the NumPy path; it only changes how the candidates are found.
"""

from __future__ import annotations

import numpy as np

from .canonical import SNAP_BITS, snap
from .errors import PipelineError

BACKENDS = ("sklearn", "faiss")
FAISS_THREADS = 1  # fixed: the same bits on any core count
MARGIN = 16  # candidates beyond k that FAISS proposes for the exact re-ranking
BLOCK_BYTES = 32 << 20  # float64 difference block of the exact distances


def check_backend(backend) -> str:
    """``backend`` if it is one of ``BACKENDS``; else a PipelineError naming the param."""
    if backend not in BACKENDS:
        raise PipelineError(f"cluster.backend must be one of {', '.join(BACKENDS)} "
                            f"(it picks the library of every vector search), got {backend!r}")
    return backend


def _check_k(k, n_reference: int) -> int:
    k = int(k)
    if not 1 <= k <= n_reference:
        raise ValueError(f"k={k} must be between 1 and the number of reference rows "
                         f"({n_reference})")
    return k


def _faiss_search(query, reference, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS ``IndexFlatL2`` search on float32 copies: (squared distances, indices)."""
    import faiss

    faiss.omp_set_num_threads(FAISS_THREADS)
    ref32 = np.ascontiguousarray(reference, dtype=np.float32)
    index = faiss.IndexFlatL2(ref32.shape[1])
    index.add(ref32)
    return index.search(np.ascontiguousarray(query, dtype=np.float32), k)


def knn(query, reference, k: int, backend: str = "sklearn") -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest ``reference`` rows of each ``query`` row (squared L2), nearest
    first, as the library computes them (float32 in FAISS; ties in library order)."""
    check_backend(backend)
    reference = np.asarray(reference)
    query = np.asarray(query)
    k = _check_k(k, len(reference))
    if backend == "faiss":
        dist, idx = _faiss_search(query, reference, k)
        return dist.astype(np.float64), idx.astype(np.int64)
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(reference)
    dist, idx = nn.kneighbors(query)
    return dist.astype(np.float64) ** 2, idx.astype(np.int64)


def _rows_per_block(per_row: int) -> int:
    return max(1, BLOCK_BYTES // max(8 * per_row, 1))


def _sq_dist(Q: np.ndarray, R_rows: np.ndarray) -> np.ndarray:
    """``((q - r) ** 2).sum(-1)`` in float64 for ``Q`` (b, d) against ``R_rows`` (m, d) or
    (b, m, d): a fresh C-ordered (b, m, d) array reduced along its last axis, so each
    value has the bits of the pipeline's broadcasts whatever the block shape."""
    R_rows = R_rows[None] if R_rows.ndim == 2 else R_rows
    return ((Q[:, None, :] - R_rows) ** 2).sum(-1)


def _brute_sq(Q: np.ndarray, R: np.ndarray, k: int, rows: np.ndarray,
              leave_one_out: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest of the query rows ``rows`` against every reference row."""
    dist, idx = np.empty((len(rows), k)), np.empty((len(rows), k), dtype=np.int64)
    step = _rows_per_block(len(R) * R.shape[1])
    for start in range(0, len(rows), step):
        sel = rows[start:start + step]
        D = _sq_dist(Q[sel], R)
        if leave_one_out:
            D[np.arange(len(sel)), sel] = np.inf
        order = np.argsort(D, axis=1, kind="stable")[:, :k]  # ties: the lower index
        dist[start:start + step] = np.take_along_axis(D, order, axis=1)
        idx[start:start + step] = order
    return dist, idx


def _faiss_error(d: int, norms2) -> np.ndarray:
    """A bound on |FAISS's float32 squared distance − the exact one| for ``d``-dimensional
    rows with ``norms2`` = ‖q‖² + max ‖r‖² (per query row).

    FAISS computes ‖q‖² + ‖r‖² − 2 q·r (BLAS) or Σ (q − r)² in float32 from float32
    copies: the error is at most ~(d + 4) unit roundoffs (2⁻²⁴) of ‖q‖² + ‖r‖²
    (dot-product bound γ_d, the input rounding, three additions); twice that is used."""
    return 4.0 * (d + 8) * 2.0 ** -24 * np.asarray(norms2, dtype=np.float64)


def exact_knn(query, reference, k: int, backend: str = "sklearn", *,
              leave_one_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest ``reference`` rows of each ``query`` row: (squared distances
    (float64, the canonical NumPy bits), indices), nearest first, ties to the lower index.

    ``leave_one_out``: ``query`` *is* ``reference`` and a row is never its own neighbour.
    ``backend`` only changes how the neighbours are found (module docstring): ``sklearn``
    compares every pair in NumPy, ``faiss`` re-ranks certified FAISS candidates.
    """
    check_backend(backend)
    Q = np.asarray(query, dtype=np.float64)
    R = np.asarray(reference, dtype=np.float64)
    if leave_one_out and len(Q) != len(R):
        raise ValueError("leave_one_out needs query and reference to be the same rows")
    k = _check_k(k, len(R) - (1 if leave_one_out else 0))
    m = min(len(R), k + MARGIN + (1 if leave_one_out else 0))
    if backend == "sklearn" or m == len(R) or len(Q) == 0:
        # nothing to search for: every reference row is a candidate
        return _brute_sq(Q, R, k, np.arange(len(Q)), leave_one_out)
    centre = R.mean(0)
    Qc, Rc = Q - centre, R - centre
    fd, fi = _faiss_search(Qc, Rc, m)
    fi = fi.astype(np.int64)
    dist, idx = np.empty((len(Q), k)), np.empty((len(Q), k), dtype=np.int64)
    step = _rows_per_block(m * R.shape[1])
    for start in range(0, len(Q), step):
        b = slice(start, start + step)
        D = _sq_dist(Q[b], R[fi[b]])
        if leave_one_out:
            D[fi[b] == np.arange(start, start + len(D))[:, None]] = np.inf
        order = np.lexsort((fi[b], D), axis=-1)[:, :k]  # by distance, then index
        dist[b] = np.take_along_axis(D, order, axis=1)
        idx[b] = np.take_along_axis(fi[b], order, axis=1)
    # Certificate: a row FAISS did not propose has a FAISS distance ≥ the last candidate's,
    # so an exact one ≥ that minus FAISS's error; it must be strictly farther than the k-th.
    err = _faiss_error(R.shape[1], (Qc ** 2).sum(1) + (Rc ** 2).sum(1).max())
    unsure = np.flatnonzero(~(fd[:, -1].astype(np.float64) - err > dist[:, -1]))
    if len(unsure):
        dist[unsure], idx[unsure] = _brute_sq(Q, R, k, unsure, leave_one_out)
    return dist, idx


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _cosine_brute(Uq: np.ndarray, Ul: np.ndarray, k: int) -> np.ndarray:
    # snapped per row (triage.canonical): a BLAS product; equal similarities must tie
    # exactly so the stable sort, not rounding noise, orders them
    sims = snap(Uq @ Ul.T, axis=1)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def cosine_knn(query, reference, k: int, backend: str = "sklearn") -> np.ndarray:
    """Indices of the ``k`` most cosine-similar ``reference`` rows of each ``query`` row,
    most similar first; similarities snapped per query row, ties to the lower index.

    With ``faiss``: on unit vectors cosine = 1 − ‖a − b‖²/2, so FAISS's L2 neighbours are
    the candidates. A row's snapping grid is set by its largest |similarity|, which is the
    most similar row or the most *anti*-similar one (the nearest to −q): both searched,
    so the grid is the full row's. Certified as in :func:`exact_knn` (rows that fail are
    computed against every reference row)."""
    check_backend(backend)
    Uq = _unit(np.asarray(query, dtype=np.float64))
    Ul = _unit(np.asarray(reference, dtype=np.float64))
    k = _check_k(k, len(Ul))
    m = min(len(Ul), k + MARGIN)
    if backend == "sklearn" or m == len(Ul) or len(Uq) == 0:
        return _cosine_brute(Uq, Ul, k)
    # FAISS's float32 error on a squared distance between unit vectors (‖q‖² + ‖r‖² ≤ 2),
    # as a similarity (÷ 2)
    err = float(_faiss_error(Ul.shape[1], 2.0)) / 2
    fd, fi = _faiss_search(Uq, Ul, m)
    ad, ai = _faiss_search(-Uq, Ul, m)
    fi, ai = fi.astype(np.int64), ai.astype(np.int64)
    out = np.empty((len(Uq), k), dtype=np.int64)
    unsure = np.zeros(len(Uq), dtype=bool)
    step = _rows_per_block(2 * m * Ul.shape[1])
    for start in range(0, len(Uq), step):
        b = slice(start, start + step)
        S = (Uq[b, None, :] * Ul[fi[b]]).sum(-1)
        A = (Uq[b, None, :] * Ul[ai[b]]).sum(-1)
        # the row's largest |similarity|: a column of it gives the candidates the full
        # row's grid (snap's grid depends on the largest magnitude only)
        top = np.maximum(np.abs(S).max(1), np.abs(A).max(1))
        snapped = snap(np.column_stack([S, top]), axis=1)[:, :-1]
        order = np.lexsort((fi[b], -snapped), axis=-1)[:, :k]
        out[b] = np.take_along_axis(fi[b], order, axis=1)
        kth = np.take_along_axis(snapped, order[:, -1:], axis=1)[:, 0]
        _, e_top = np.frexp(top)
        quantum = np.ldexp(1.0, e_top.astype(np.int64) - SNAP_BITS)
        # a row not proposed has a similarity in [worst_other, best_other]
        best_other = 1 - (fd[b, -1].astype(np.float64) / 2 - err)
        worst_other = (ad[b, -1].astype(np.float64) / 2 - err) - 1
        _, e_best = np.frexp(np.maximum(np.abs(best_other), np.abs(worst_other)))
        # it must snap strictly below the k-th, and leave the grid as it is
        unsure[b] = ~((best_other < kth - quantum) & (e_best <= e_top))
    rows = np.flatnonzero(unsure)
    if len(rows):
        out[rows] = _cosine_brute(Uq[rows], Ul, k)
    return out


def knn_graph(Z, k: int, backend: str = "sklearn"):
    """Connectivity graph of each row's ``k`` nearest rows, itself included (as
    scikit-learn's ``kneighbors_graph`` of the fitted points): CSR, ones, nearest first.

    The same graph as scikit-learn's except where a row's k-th neighbour is tied (exact
    copies): scikit-learn keeps whichever argpartition leaves, this the lower index."""
    from scipy import sparse

    Z = np.asarray(Z, dtype=np.float64)
    _, idx = exact_knn(Z, Z, k, backend)
    n = len(Z)
    return sparse.csr_matrix((np.ones(n * k), idx.ravel(), np.arange(0, n * k + 1, k)),
                             shape=(n, n))


class KnnKernel:
    """A ``LabelSpreading`` kernel: the ``k``-nearest-neighbour connectivity graph from
    :func:`knn_graph` (the graph of ``kernel="knn"``, found by ``backend``).

    scikit-learn calls ``kernel(X, X)`` in fit (the graph of the training points, rows =
    points) and ``kernel(X_, X_new)`` in predict, then transposes it: for new points the
    (n_train, n_new) matrix has a one where a training point is among a new point's k
    nearest, which is what ``kernel="knn"`` averages over in predict."""

    def __init__(self, k: int, backend: str = "sklearn"):
        self.k, self.backend = int(k), check_backend(backend)

    def __call__(self, X, Y):
        if Y is X:
            return knn_graph(X, self.k, self.backend)
        from scipy import sparse

        _, idx = exact_knn(Y, X, self.k, self.backend)
        n_new = len(idx)
        return sparse.csr_matrix((np.ones(n_new * self.k), idx.ravel(),
                                  np.arange(0, n_new * self.k + 1, self.k)),
                                 shape=(n_new, len(X))).T.tocsr()
