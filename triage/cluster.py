"""Clustering of the image pool in embedding space (labelled + unlabelled, never test)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler


class PoolClusterer(ClusterMixin, BaseEstimator):
    """StandardScaler → PCA → KMeans, fitted on the pool only.

    Test vectors are only ever passed to ``predict`` so the test set cannot shape the
    clusters that later produce pseudo-labels.
    """

    def __init__(self, n_components: int = 32, k: int = 8, random_state: int = 0):
        self.n_components, self.k, self.random_state = n_components, k, random_state

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=np.float64)
        if len(X) < self.k:
            raise ValueError(f"cluster.k={self.k} is larger than the pool ({len(X)} images)")
        n_comp = int(min(self.n_components, X.shape[0], X.shape[1]))
        self.reducer_ = Pipeline([("scale", StandardScaler()),
                                  ("pca", PCA(n_components=n_comp, random_state=self.random_state))])
        Z = self.reducer_.fit_transform(X)
        self.kmeans_ = KMeans(n_clusters=self.k, n_init=10, random_state=self.random_state).fit(Z)
        self.labels_ = self.kmeans_.labels_
        self.explained_variance_ = float(self.reducer_["pca"].explained_variance_ratio_.sum())
        return self

    def transform(self, X) -> np.ndarray:
        """PCA coordinates (the space the clusters live in)."""
        return self.reducer_.transform(np.asarray(X, dtype=np.float64))

    def predict(self, X) -> np.ndarray:
        return self.kmeans_.predict(self.transform(X))

    # Plain-JSON persistence: no code runs on load, and it avoids importing skops (which
    # scans all of scikit-learn, seconds per stage) for a model this simple.
    def to_dict(self) -> dict:
        scale, pca, km = self.reducer_["scale"], self.reducer_["pca"], self.kmeans_
        return {"params": self.get_params(),
                "scale_mean": scale.mean_.tolist(), "scale_scale": scale.scale_.tolist(),
                "pca_mean": pca.mean_.tolist(), "pca_components": pca.components_.tolist(),
                "explained_variance": self.explained_variance_,
                "centers": km.cluster_centers_.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "PoolClusterer":
        """Rebuild a fitted clusterer whose transform/predict equal the saved one's."""
        self = cls(**d["params"])
        scale = StandardScaler()
        scale.mean_, scale.scale_ = np.asarray(d["scale_mean"]), np.asarray(d["scale_scale"])
        scale.var_ = scale.scale_ ** 2
        scale.n_features_in_ = len(scale.mean_)
        pca = PCA(n_components=len(d["pca_components"]))
        pca.mean_, pca.components_ = np.asarray(d["pca_mean"]), np.asarray(d["pca_components"])
        pca.n_components_, pca.n_features_in_ = len(pca.components_), len(pca.mean_)
        pca.whiten = False
        self.reducer_ = Pipeline([("scale", scale), ("pca", pca)])
        centers = np.asarray(d["centers"])
        km = KMeans(n_clusters=len(centers))
        km.cluster_centers_, km.n_features_in_ = centers, centers.shape[1]
        km._n_threads = 1
        self.kmeans_ = km
        self.explained_variance_ = d["explained_variance"]
        return self


def cluster_quality(Z: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Label-free proxies; silhouette on a seeded sample to stay fast on big pools."""
    if len(np.unique(labels)) < 2:
        return {"silhouette": float("nan"), "davies_bouldin": float("nan"),
                "calinski_harabasz": float("nan")}
    sample = min(len(Z), 5000)
    return {
        "silhouette": float(silhouette_score(Z, labels, sample_size=sample, random_state=seed)),
        "davies_bouldin": float(davies_bouldin_score(Z, labels)),
        "calinski_harabasz": float(calinski_harabasz_score(Z, labels)),
    }


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
