"""Stage `cluster`: scaler → PCA → KMeans | GMM | HDBSCAN fitted on labelled + unlabelled (never test)."""
from pathlib import Path

import pandas as pd

from triage.cluster import cluster_purity, cluster_quality, make_clusterer, projection_image
from triage.io import atomic_path, open_live, run_stage, write_csv, write_json, write_parquet
from triage.params import load_params
from triage.store import read_embeddings

EMBEDDINGS = Path("data/features/embeddings.parquet")
ASSIGNMENTS = Path("data/cluster/assignments.parquet")
CLUSTERS = Path("data/cluster/clusters.csv")
MODEL = Path("data/cluster/clusterer.json")
PROJECTION = Path("reports/cluster_projection.png")


def main() -> None:
    params = load_params()
    c, positive = params["cluster"], params["data"]["positive_class"]
    rows, X, fingerprint = read_embeddings(EMBEDDINGS)
    pool = rows["split"].isin(["labeled", "unlabeled"]).to_numpy()
    model = make_clusterer(c).fit(X[pool])
    # Pool points keep their fitted cluster (HDBSCAN noise stays -1); test points are
    # only ever assigned (nearest centre), never fitted.
    assigned = model.predict(X)
    assigned[pool] = model.labels_
    assignments = rows[["id", "split"]].assign(cluster=assigned.astype("int32"))
    Z = model.transform(X[pool])
    used = int(model.n_components_)
    if used < int(c["pca_components"]):
        print(f"cluster: note: cluster.pca_components={c['pca_components']} capped to {used} "
              f"(at most min(images to cluster, embedding dimensions) = min({int(pool.sum())}, "
              f"{X.shape[1]})); metric pca_components_used")
    clustered = model.labels_ >= 0
    quality = cluster_quality(Z[clustered], model.labels_[clustered], seed=c["seed"])
    known = rows.loc[pool, "label"].where(rows.loc[pool, "split"] == "labeled")
    purity = cluster_purity(model.labels_, known, positive)
    purity["labeled_coverage"] = (purity["n_labeled"] / purity["size"]).round(6)

    write_parquet(assignments, ASSIGNMENTS)
    write_csv(purity, CLUSTERS)
    write_json({**model.to_dict(), "embedding_fingerprint": fingerprint.get("fingerprint", "")}, MODEL)
    with open_live("cluster") as live:
        for key, value in quality.items():
            if pd.notna(value):
                live.log_metric(key, round(value, 6), plot=False)
        live.log_metric("explained_variance", round(model.explained_variance_, 6), plot=False)
        live.log_metric("k", int(model.k_), plot=False)
        live.log_metric("pca_components_used", used, plot=False)
        live.log_metric("noise_fraction", round(float((~clustered).mean()), 6), plot=False)
        real = purity[purity["cluster"] >= 0]
        with_labels = real[real["n_labeled"] > 0]
        live.log_metric("clusters_with_labels", int(len(with_labels)), plot=False)
        weighted = (with_labels["purity"] * with_labels["n_labeled"]).sum() / max(
            with_labels["n_labeled"].sum(), 1)
        live.log_metric("labeled_purity", round(float(weighted), 6), plot=False)
        live.log_metric("pool_in_labeled_clusters", round(float(
            real.loc[real["n_labeled"] > 0, "size"].sum() / max(int(pool.sum()), 1)), 6),
            plot=False)
        live.log_plot("purity", purity.assign(purity=purity["purity"].fillna(0)),
                      x="purity", y="cluster", template="bar_horizontal",
                      title="Purity of each cluster (labelled points)")
        live.log_plot("coverage", purity[["cluster", "labeled_coverage"]], x="labeled_coverage",
                      y="cluster", template="bar_horizontal",
                      title="Share of each cluster that is labelled")
        sweep = model.sweep_ or [{"k": int(model.k_), "silhouette": quality["silhouette"]}]
        live.log_plot("k_sweep", pd.DataFrame(sweep).fillna(0.0).round(6), x="k",
                      y="silhouette", template="linear", title="Silhouette by k (cluster.k: auto)")
    # One point per image, with its label: derived from patient data, so a cached DVC
    # output (reports/, git-ignored) rather than a git-tracked metrics file.
    with atomic_path(PROJECTION) as tmp:
        projection_image(Z[:, :2], model.labels_, known, positive).save(tmp, format="PNG")
    print(f"cluster: {c['method']} k={model.k_} silhouette={quality['silhouette']:.3f} "
          f"explained_variance={model.explained_variance_:.3f}")


if __name__ == "__main__":
    run_stage(main)
