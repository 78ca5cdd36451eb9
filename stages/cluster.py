"""Stage `cluster`: scaler → PCA → KMeans fitted on labelled + unlabelled (never test)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from triage.cluster import PoolClusterer, cluster_purity, cluster_quality  # noqa: E402
from triage.embed import read_embeddings  # noqa: E402
from triage.io import open_live, run_stage, write_csv, write_json, write_parquet  # noqa: E402
from triage.params import load_params  # noqa: E402

EMBEDDINGS = Path("data/features/embeddings.parquet")
ASSIGNMENTS = Path("data/cluster/assignments.parquet")
CLUSTERS = Path("data/cluster/clusters.csv")
MODEL = Path("data/cluster/clusterer.json")


def main() -> None:
    params = load_params()
    c, positive = params["cluster"], params["data"]["positive_class"]
    rows, X, fp = read_embeddings(EMBEDDINGS)
    pool = rows["split"].isin(["labeled", "unlabeled"]).to_numpy()
    model = PoolClusterer(n_components=c["pca_components"], k=c["k"], random_state=c["seed"])
    model.fit(X[pool])
    assignments = rows[["id", "split"]].assign(cluster=model.predict(X).astype("int32"))
    quality = cluster_quality(model.transform(X[pool]), model.labels_, seed=c["seed"])
    purity = cluster_purity(model.labels_, rows.loc[pool, "label"].where(
        rows.loc[pool, "split"] == "labeled"), positive)

    write_parquet(assignments, ASSIGNMENTS)
    write_csv(purity, CLUSTERS)
    write_json({**model.to_dict(), "embedding_fingerprint": fp.get("fingerprint", "")}, MODEL)
    with open_live("cluster") as live:
        for key, value in quality.items():
            if pd.notna(value):
                live.log_metric(key, round(value, 6), plot=False)
        live.log_metric("explained_variance", round(model.explained_variance_, 6), plot=False)
        live.log_metric("k", c["k"], plot=False)
        with_labels = purity[purity["n_labeled"] > 0]
        live.log_metric("clusters_with_labels", int(len(with_labels)), plot=False)
        weighted = (with_labels["purity"] * with_labels["n_labeled"]).sum() / max(
            with_labels["n_labeled"].sum(), 1)
        live.log_metric("labeled_purity", round(float(weighted), 6), plot=False)
        live.log_plot("purity", purity.assign(purity=purity["purity"].fillna(0)),
                      x="purity", y="cluster", template="bar_horizontal",
                      title="Purity of each cluster (labelled points)")


if __name__ == "__main__":
    run_stage(main)
