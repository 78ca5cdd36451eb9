"""FAISS vs scikit-learn on synthetic float32 vectors: k-means (k=8) and exact kNN (k=10).

    python benchmarks/faiss_vs_sklearn.py [--n 100000] [--dim 512] [--also-1m]

Each measurement runs in a fresh subprocess (same seeded data), so its peak RSS is its own:
``peak_rss_mb`` is the process's high-water mark (VmHWM) minus the RSS right after the data
was made. Both libraries do the same work: k-means = 20 Lloyd iterations from the same
seeded initial centres, all points used (FAISS ``max_points_per_centroid`` raised); kNN =
1,000 queries, exact (FAISS ``IndexFlatL2``, scikit-learn ``NearestNeighbors(algorithm="brute")``). Threads: FAISS and
scikit-learn/OpenBLAS both use all cores (``--threads``), so the ratios compare libraries,
not thread counts. Ratios are taken within one run. Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

K, NITER, KNN_K, N_QUERIES = 8, 20, 10, 1000


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _worker(task: str, n: int, dim: int, threads: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(K, dim)).astype(np.float32)
    X = centres[rng.integers(0, K, size=n)] + rng.standard_normal((n, dim), dtype=np.float32)
    Q = X[rng.choice(n, N_QUERIES, replace=False)] + 0.1 * rng.standard_normal(
        (N_QUERIES, dim), dtype=np.float32)
    # the same K starting centres for both k-means (seeded points of X): the ARI then
    # measures the libraries, not two random inits landing in different local optima
    init = X[rng.choice(n, K, replace=False)].copy()
    base = _rss_kb("VmRSS:")
    t0 = time.perf_counter()
    out = {}
    if task == "kmeans_faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        km = faiss.Kmeans(dim, K, niter=NITER, nredo=1, seed=0, max_points_per_centroid=-(-n // K))
        km.train(X, init_centroids=init)
        _, labels = km.index.search(X, 1)
        out["labels"] = labels[:, 0]
    elif task == "kmeans_sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=K, n_init=1, max_iter=NITER, tol=0.0, init=init,
                    random_state=0).fit(X)
        out["labels"] = km.labels_
    elif task == "knn_faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatL2(dim)
        index.add(X)
        _, idx = index.search(Q, KNN_K)
        out["idx"] = idx
    elif task == "knn_sklearn":
        from sklearn.neighbors import NearestNeighbors

        _, idx = NearestNeighbors(n_neighbors=KNN_K, algorithm="brute").fit(X).kneighbors(Q)
        out["idx"] = idx
    seconds = time.perf_counter() - t0
    res = {"seconds": round(seconds, 3), "peak_rss_mb": round((_rss_kb("VmHWM:") - base) / 1024, 1)}
    np.save(os.environ["BENCH_OUT"], next(iter(out.values())))
    return res


def _run(task, n, dim, threads, tmp):
    path = os.path.join(tmp, f"{task}_{n}.npy")
    env = {**os.environ, "BENCH_OUT": path, "OMP_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads)}
    env.pop("OPENBLAS_CORETYPE", None)
    p = subprocess.run([sys.executable, __file__, "--worker", task, "--n", str(n), "--dim", str(dim),
                        "--threads", str(threads)], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1]), path


def _cpu() -> dict:
    model, flags = platform.processor(), ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line
    except OSError:
        pass
    return {"model_name": model, "avx512f": " avx512f" in flags, "cores": os.cpu_count()}


def bench(n: int, dim: int, threads: int, tmp: str) -> dict:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    r = {t: _run(t, n, dim, threads, tmp) for t in
         ("kmeans_faiss", "kmeans_sklearn", "knn_faiss", "knn_sklearn")}
    ari = adjusted_rand_score(np.load(r["kmeans_sklearn"][1]), np.load(r["kmeans_faiss"][1]))
    a, b = np.load(r["knn_faiss"][1]), np.load(r["knn_sklearn"][1])
    overlap = float(np.mean([len(set(x) & set(y)) / KNN_K for x, y in zip(a, b)]))
    res = {k: v[0] for k, v in r.items()}
    for task in ("kmeans", "knn"):
        f, s = res[f"{task}_faiss"], res[f"{task}_sklearn"]
        res[f"{task}_speedup_faiss_over_sklearn"] = round(s["seconds"] / f["seconds"], 2)
        res[f"{task}_rss_ratio_faiss_over_sklearn"] = (
            round(f["peak_rss_mb"] / s["peak_rss_mb"], 2) if s["peak_rss_mb"] > 0 else None)
    res["kmeans_ari_faiss_vs_sklearn"] = round(float(ari), 4)
    res["knn_neighbour_overlap"] = round(overlap, 4)
    return {"n": n, "dim": dim, **res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--also-1m", action="store_true", help="also run n=1,000,000 (~2 GB of vectors)")
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(_worker(a.worker, a.n, a.dim, a.threads)))
        return
    import tempfile

    import faiss
    import sklearn

    with tempfile.TemporaryDirectory() as tmp:
        runs = [bench(a.n, a.dim, a.threads, tmp)]
        if a.also_1m:
            runs.append(bench(1_000_000, a.dim, a.threads, tmp))
    print(json.dumps({"cpu": _cpu(), "threads": a.threads, "faiss": faiss.__version__,
                      "sklearn": sklearn.__version__, "k": K, "niter": NITER, "knn_k": KNN_K,
                      "queries": N_QUERIES, "runs": runs,
                      "skipped_1m": None if a.also_1m else "not requested (--also-1m)"}, indent=1))


if __name__ == "__main__":
    main()
