"""Clustering of the image pool in embedding space (labelled + unlabelled, never test)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score
from sklearn.preprocessing import StandardScaler

from .canonical import CanonicalPipeline, canonical_reducer, snap, snap_relative
from .errors import PipelineError

if TYPE_CHECKING:
    from PIL import Image


class PoolClusterer(ClusterMixin, BaseEstimator):
    """StandardScaler → PCA → KMeans | GaussianMixture | HDBSCAN, fitted on the pool only.

    Test vectors are only ever passed to ``predict`` so the test set cannot shape the
    clusters that later produce pseudo-labels. ``k="auto"`` fits every k of ``k_range``
    (KMeans/GMM) and keeps the best silhouette (``sweep_`` holds the curve). HDBSCAN finds
    its own number of clusters and marks noise as -1 in ``labels_``; ``predict`` on new
    points assigns the nearest cluster centroid (noise is a property of the fitted pool).
    """

    def __init__(self, n_components: int = 32, k=8, random_state: int = 0,
                 method: str = "kmeans", k_range: tuple = (2, 12),
                 min_cluster_size: int = 15, backend: str = "sklearn"):
        self.n_components, self.k, self.random_state = n_components, k, random_state
        self.method, self.k_range, self.min_cluster_size = method, k_range, min_cluster_size
        self.backend = backend

    def _fit_k(self, Z, k):
        if self.method == "gmm":
            from sklearn.mixture import GaussianMixture

            gm = GaussianMixture(n_components=k, covariance_type="diag", n_init=2,
                                 random_state=self.random_state, reg_covar=1e-4).fit(Z)
            labels, centers = gm.predict(Z), gm.means_
        elif self.backend == "faiss":
            labels, centers = faiss_kmeans(Z, k, seed=self.random_state)
        else:
            # tol=0: Lloyd runs until no label changes (strict convergence), so where it
            # stops does not hang on a float comparison that another CPU could flip.
            km = KMeans(n_clusters=k, n_init=10, tol=0.0, random_state=self.random_state).fit(Z)
            labels, centers = km.labels_, km.cluster_centers_
        return labels, centroids(Z, labels, centers)

    def _check_sizes(self, n: int) -> None:
        """Clear errors, naming the params, when the pool is too small for the settings."""
        if self.method == "hdbscan":
            if n < int(self.min_cluster_size):
                raise PipelineError(
                    f"cluster.min_cluster_size={self.min_cluster_size} is larger than the number "
                    f"of images to cluster ({n}): HDBSCAN cannot form a single cluster; lower "
                    f"cluster.min_cluster_size to at most {n} or cluster more images")
        elif self.k == "auto":
            lo, hi = int(self.k_range[0]), int(self.k_range[1])
            if lo > n - 1:
                raise PipelineError(
                    f"cluster.k_min={lo} (cluster.k_max={hi}) is too large for the {n} images to "
                    f"cluster: k: auto scores each k by silhouette, which needs k <= "
                    f"{max(n - 1, 0)} (number of images - 1); lower cluster.k_min/cluster.k_max "
                    f"or cluster more images")
        elif int(self.k) > n:
            raise PipelineError(f"cluster.k={self.k} is larger than the number of images to "
                                f"cluster ({n}); lower cluster.k or cluster more images")

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=np.float64)
        self._check_sizes(len(X))
        n_comp = int(min(self.n_components, X.shape[0], X.shape[1]))
        # PCA cannot keep more components than images or dimensions: the value used is
        # reported (cluster stage: metric pca_components_used, a note when capped)
        self.n_components_ = n_comp
        self.reducer_ = canonical_reducer(n_comp, self.random_state).fit(X)
        Z = self.transform(X)
        self.sweep_ = []
        if self.method == "hdbscan":
            from sklearn.cluster import HDBSCAN

            labels = HDBSCAN(min_cluster_size=self.min_cluster_size, copy=True).fit_predict(Z)
            found = sorted(set(labels.tolist()) - {-1})
            # renumber 0..n-1 (noise stays -1); centroids of the found clusters
            remap = {c: i for i, c in enumerate(found)}
            labels = np.array([remap.get(c, -1) for c in labels])
            centers = (centroids(Z, labels, np.zeros((len(found), Z.shape[1])))
                       if found else snap(Z.mean(axis=0, keepdims=True)))
        elif self.k == "auto":
            lo, hi = int(self.k_range[0]), int(min(self.k_range[1], len(X) - 1))
            best = None
            for k in range(lo, hi + 1):
                labels_k, centers_k = self._fit_k(Z, k)
                s = cluster_quality(Z, labels_k, seed=self.random_state)["silhouette"]
                self.sweep_.append({"k": k, "silhouette": s})
                if best is None or s > best[0] + 1e-12:
                    best = (s, k, labels_k, centers_k)
            _, self.k_, labels, centers = best
        else:
            labels, centers = self._fit_k(Z, int(self.k))
        self.k_ = int(len(centers)) if self.method == "hdbscan" else int(len(centers))
        self.labels_ = np.asarray(labels, dtype=np.int64)
        self.centers_ = np.asarray(centers, dtype=np.float64)
        self.explained_variance_ = float(self.reducer_["pca"].explained_variance_ratio_.sum())
        return self

    def transform(self, X) -> np.ndarray:
        """PCA coordinates (the space the clusters live in), snapped (triage.canonical)."""
        return snap(self.reducer_.transform(np.asarray(X, dtype=np.float64)), axis=1)

    def predict(self, X) -> np.ndarray:
        """Nearest cluster centre in PCA space (= KMeans' rule; GMM/HDBSCAN: centroid)."""
        Z = self.transform(X)
        d = ((Z[:, None, :] - self.centers_[None, :, :]) ** 2).sum(axis=2)
        return d.argmin(axis=1).astype(np.int64)

    # Plain-JSON persistence: no code runs on load, and it avoids importing skops (which
    # scans all of scikit-learn, seconds per stage) for a model this simple.
    def to_dict(self) -> dict:
        scale, pca = self.reducer_["scale"], self.reducer_["pca"]
        params = self.get_params()
        params["k_range"] = list(params["k_range"])
        if params.get("backend") == "sklearn":
            # the default is left out, so the committed clusterer.json keeps its bytes
            del params["backend"]
        return {"params": params, "k_chosen": self.k_,
                "scale_mean": scale.mean_.tolist(), "scale_scale": scale.scale_.tolist(),
                "pca_mean": pca.mean_.tolist(), "pca_components": pca.components_.tolist(),
                "explained_variance": self.explained_variance_,
                "centers": self.centers_.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> PoolClusterer:
        """Rebuild a fitted clusterer whose transform/predict equal the saved one's."""
        params = dict(d["params"])
        params["k_range"] = tuple(params.get("k_range", (2, 12)))
        self = cls(**params)
        scale = StandardScaler()
        scale.mean_, scale.scale_ = np.asarray(d["scale_mean"]), np.asarray(d["scale_scale"])
        scale.var_ = scale.scale_ ** 2
        scale.n_features_in_ = len(scale.mean_)
        pca = PCA(n_components=len(d["pca_components"]))
        pca.mean_, pca.components_ = np.asarray(d["pca_mean"]), np.asarray(d["pca_components"])
        pca.n_components_, pca.n_features_in_ = len(pca.components_), len(pca.mean_)
        pca.whiten = False
        self.reducer_ = CanonicalPipeline([("scale", scale), ("pca", pca)])
        self.centers_ = np.asarray(d["centers"])
        self.k_ = int(d.get("k_chosen", len(self.centers_)))
        self.explained_variance_ = d["explained_variance"]
        return self


# FAISS k-means settings (cluster.backend: faiss). One OpenMP thread: FAISS's BLAS
# distance blocks and reductions then run in a fixed order, so two fits give the same bits.
FAISS_THREADS = 1
FAISS_NITER = 300   # fixed Lloyd iterations (sklearn's max_iter; FAISS has no tol)
FAISS_NREDO = 10    # restarts, best objective kept (sklearn's n_init=10)


def faiss_kmeans_options(n: int, k: int, seed: int) -> dict:
    """Options for ``faiss.Kmeans``. FAISS trains on at most ``max_points_per_centroid * k``
    points (default 256: with k=2 it would train on a 512-point sample); it is set to
    ``ceil(n / k)`` so the whole input is used, like scikit-learn's KMeans."""
    return {"niter": FAISS_NITER, "nredo": FAISS_NREDO, "seed": int(seed),
            "max_points_per_centroid": -(-int(n) // int(k)),
            "min_points_per_centroid": 1,   # small pools: no "too few points" warning
            "verbose": False}


def faiss_kmeans(Z: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and centres of a seeded ``faiss.Kmeans`` on float32 ``Z``; the points are
    assigned to the trained centres with an exact ``IndexFlatL2``. FAISS is imported here
    only, so stages that never cluster with it never load it."""
    import faiss

    faiss.omp_set_num_threads(FAISS_THREADS)
    Z32 = np.ascontiguousarray(Z, dtype=np.float32)
    km = faiss.Kmeans(Z32.shape[1], int(k), **faiss_kmeans_options(len(Z32), k, seed))
    km.train(Z32)
    index = faiss.IndexFlatL2(Z32.shape[1])
    index.add(np.ascontiguousarray(km.centroids, dtype=np.float32))
    _, nearest = index.search(Z32, 1)
    return nearest[:, 0].astype(np.int64), km.centroids.astype(np.float64)


def centroids(Z: np.ndarray, labels: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Snapped mean of each cluster's points, recomputed from the labels (NumPy's
    fixed-order sum), so the centres depend on which points a cluster holds, not on the
    clustering library's last update; a cluster with no point keeps its fitted centre."""
    fallback = np.asarray(fallback, dtype=np.float64)
    out = fallback.copy()
    for i in range(len(fallback)):
        members = Z[labels == i]
        if len(members):
            out[i] = members.mean(axis=0)
    return snap(out)


def make_clusterer(c: dict) -> PoolClusterer:
    """A PoolClusterer from the ``cluster.*`` params."""
    return PoolClusterer(n_components=c["pca_components"], k=c["k"], random_state=c["seed"],
                         method=c["method"], k_range=(c["k_min"], c["k_max"]),
                         min_cluster_size=c["min_cluster_size"],
                         backend=c.get("backend", "sklearn"))


def cluster_quality(Z: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Label-free proxies; silhouette on a seeded sample to stay fast on big pools."""
    if len(np.unique(labels)) < 2:
        return {"silhouette": float("nan"), "davies_bouldin": float("nan"),
                "calinski_harabasz": float("nan")}
    sample = min(len(Z), 5000)
    # snapped (triage.canonical): pairwise distances are BLAS products, and the silhouette
    # also picks k under `k: auto`
    scores = [silhouette_score(Z, labels, sample_size=sample, random_state=seed),
              davies_bouldin_score(Z, labels), calinski_harabasz_score(Z, labels)]
    silhouette, davies_bouldin, calinski_harabasz = (float(v) for v in snap_relative(scores))
    return {"silhouette": silhouette, "davies_bouldin": davies_bouldin,
            "calinski_harabasz": calinski_harabasz}


def cluster_purity(clusters: np.ndarray, labels: pd.Series, positive: str) -> pd.DataFrame:
    """Per cluster: size, labelled support, positives/negatives, majority label and purity.

    ``labels`` holds class names for labelled points and None for unlabelled ones.
    """
    df = pd.DataFrame({"cluster": clusters, "label": labels.to_numpy()})
    out = []
    for c, g in df.groupby("cluster", sort=True):
        known = g["label"].dropna()
        n_pos = int((known == positive).sum())
        n_neg = int(len(known) - n_pos)
        majority = None if len(known) == 0 else (positive if n_pos >= n_neg else
                                                  known[known != positive].iloc[0])
        purity = float(max(n_pos, n_neg) / len(known)) if len(known) else float("nan")
        out.append({"cluster": int(c), "size": int(len(g)), "n_labeled": int(len(known)),
                    "n_positive": n_pos, "n_negative": n_neg, "majority": majority,
                    "purity": purity})
    return pd.DataFrame(out)


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def projection_image(Z2: np.ndarray, clusters: np.ndarray, labels: pd.Series, positive: str,
                     size: int = 360) -> Image.Image:
    """Two side-by-side 2-D scatters (PCA components 1-2) drawn with Pillow: left coloured
    by cluster (noise grey), right by known label (pool grey, positive red, other blue,
    labelled points drawn larger). Deterministic bytes for the same inputs."""
    from PIL import Image, ImageDraw

    Z2 = np.asarray(Z2, float)[:, :2]
    lo, hi = Z2.min(axis=0), Z2.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    pad = 24
    xy = pad + (Z2 - lo) / span * (size - 2 * pad)
    xy[:, 1] = size - xy[:, 1]
    img = Image.new("RGB", (2 * size, size + 18), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 4), "PCA 1-2 by cluster (grey = noise)", fill="black")
    d.text((size + 8, 4), f"by known label (red = {positive}, blue = other, grey = pool)",
           fill="black")
    lab = labels.to_numpy(dtype=object)
    known = pd.notna(lab)
    for i in np.argsort(known, kind="mergesort"):  # labelled points drawn last (on top)
        x, y = xy[i]
        c = int(clusters[i])
        col = (170, 170, 170) if c < 0 else _COLOURS[c % len(_COLOURS)]
        d.ellipse([x - 1.5, y + 18 - 1.5, x + 1.5, y + 18 + 1.5], fill=col)
        if known[i]:
            col2, r = ((214, 39, 40) if lab[i] == positive else (31, 119, 180)), 3.0
        else:
            col2, r = (200, 200, 200), 1.5
        d.ellipse([size + x - r, y + 18 - r, size + x + r, y + 18 + r], fill=col2)
    d.line([size, 0, size, size + 18], fill="black")
    return img
