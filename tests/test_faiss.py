"""cluster.backend: faiss (triage.cluster) and triage.neighbours.knn against scikit-learn."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from triage.cluster import PoolClusterer, faiss_kmeans, faiss_kmeans_options, make_clusterer
from triage.errors import ParamsError
from triage.neighbours import knn
from triage.params import load_params

faiss = pytest.importorskip("faiss")

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
ARI_BOUND = 0.95  # stated bound: FAISS k-means vs scikit-learn KMeans on the same points


# --------------------------------------------------------------------------- exact kNN

@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
def test_knn_matches_sklearn_nearest_neighbors(backend):
    rng = np.random.default_rng(0)
    ref, query = rng.normal(size=(300, 16)), rng.normal(size=(50, 16))
    want = NearestNeighbors(n_neighbors=7, algorithm="brute").fit(ref).kneighbors(query)
    dist, idx = knn(query, ref, 7, backend=backend)
    assert idx.shape == dist.shape == (50, 7)
    # exact index: the same neighbour sets (continuous random data: no ties)
    assert [set(r) for r in idx] == [set(r) for r in want[1]]
    np.testing.assert_allclose(dist, want[0] ** 2, rtol=1e-4, atol=1e-4)
    assert (np.diff(dist, axis=1) >= -1e-6).all()  # nearest first


def test_knn_rejects_bad_arguments():
    ref = np.zeros((5, 2))
    with pytest.raises(ValueError, match="backend"):
        knn(ref, ref, 1, backend="annoy")
    with pytest.raises(ValueError, match="k=6"):
        knn(ref, ref, 6, backend="faiss")


# --------------------------------------------------------------------------- k-means

def test_faiss_kmeans_agrees_with_sklearn_on_blobs():
    X, truth = make_blobs(n_samples=2000, centers=6, n_features=16, cluster_std=1.5,
                          random_state=0)
    labels, centers = faiss_kmeans(X, 6, seed=0)
    sk = KMeans(n_clusters=6, n_init=10, random_state=0).fit(X)
    assert centers.shape == (6, 16) and centers.dtype == np.float64
    assert adjusted_rand_score(sk.labels_, labels) >= ARI_BOUND
    assert adjusted_rand_score(truth, labels) >= ARI_BOUND


def _demo_like(seed=0):
    """Like the demo's pool: 512-d vectors, 12 groups of unequal size and spread."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(12, 512))
    sizes = rng.integers(20, 60, size=12)
    truth = np.repeat(np.arange(12), sizes)
    X = centres[truth] + rng.normal(scale=rng.uniform(0.8, 1.6, size=(12, 1))[truth],
                                    size=(len(truth), 512))
    return X, truth


def test_pool_clusterer_faiss_agrees_with_sklearn_on_a_demo_like_pool():
    X, truth = _demo_like()
    c = dict(load_params(PARAMS_FILE)["cluster"])
    sk = make_clusterer(c).fit(X)
    fa = make_clusterer({**c, "backend": "faiss"}).fit(X)
    assert fa.backend == "faiss" and sk.backend == "sklearn"
    assert adjusted_rand_score(sk.labels_, fa.labels_) >= ARI_BOUND
    assert adjusted_rand_score(truth, fa.labels_) >= ARI_BOUND


def test_faiss_k_auto_sweeps_like_sklearn():
    X, _ = make_blobs(n_samples=300, centers=4, n_features=8, random_state=1)
    fa = PoolClusterer(n_components=4, k="auto", k_range=(2, 6), backend="faiss").fit(X)
    sk = PoolClusterer(n_components=4, k="auto", k_range=(2, 6)).fit(X)
    assert [r["k"] for r in fa.sweep_] == [2, 3, 4, 5, 6]
    assert fa.k_ == sk.k_ == 4
    assert adjusted_rand_score(sk.labels_, fa.labels_) >= ARI_BOUND


def test_max_points_per_centroid_covers_the_whole_input(capfd):
    n, k = 2000, 2
    opts = faiss_kmeans_options(n, k, seed=0)
    assert opts["max_points_per_centroid"] * k >= n
    # FAISS's default (256 per centroid) would train k=2 on a 512-point sample
    default = faiss.Kmeans(8, k)
    assert default.cp.max_points_per_centroid == 256 and 256 * k < n
    X = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    faiss.Kmeans(8, k, niter=2, seed=0, verbose=True).train(X)
    assert f"Sampling a subset of {256 * k} / {n}" in capfd.readouterr().out
    ours = faiss.Kmeans(8, k, **{**opts, "niter": 2, "verbose": True})
    assert ours.cp.max_points_per_centroid * k >= n
    ours.train(X)
    assert "Sampling a subset" not in capfd.readouterr().out


def test_faiss_fit_is_deterministic():
    X, _ = _demo_like(seed=3)
    a = PoolClusterer(n_components=32, k=12, random_state=42, backend="faiss").fit(X)
    b = PoolClusterer(n_components=32, k=12, random_state=42, backend="faiss").fit(X)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert a.centers_.tobytes() == b.centers_.tobytes()
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())


def test_saved_json_format_is_the_same_for_both_backends():
    X, _ = make_blobs(n_samples=200, centers=3, n_features=8, random_state=2)
    sk = PoolClusterer(n_components=4, k=3).fit(X).to_dict()
    fa_model = PoolClusterer(n_components=4, k=3, backend="faiss").fit(X)
    fa = fa_model.to_dict()
    assert "backend" not in sk["params"]  # the default keeps the committed bytes
    assert fa["params"]["backend"] == "faiss"
    assert set(sk) == set(fa)
    assert np.asarray(fa["centers"]).shape == np.asarray(sk["centers"]).shape == (3, 4)
    assert all(isinstance(v, float) for row in fa["centers"] for v in row)
    back = PoolClusterer.from_dict(json.loads(json.dumps(fa)))
    np.testing.assert_array_equal(back.predict(X), fa_model.predict(X))


# --------------------------------------------------------------------------- params

def test_cluster_backend_param():
    assert load_params(PARAMS_FILE)["cluster"]["backend"] == "sklearn"


@pytest.mark.parametrize("value", ["FAISS", "annoy", 1])
def test_cluster_backend_rejects_other_values(tmp_path, value):
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["cluster"]["backend"] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ParamsError, match="cluster.backend"):
        load_params(path)


def test_faiss_is_not_imported_by_the_default_backend():
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from triage.cluster import PoolClusterer\n"
            "PoolClusterer(n_components=2, k=2).fit(np.random.default_rng(0).normal(size=(20, 4)))\n"
            "assert 'faiss' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
