"""Stage `select`: rank unlabelled images for annotation → data/annotation/to_label.csv.

(Not named stages/select.py: the script folder is first on sys.path and a `select.py` there
would shadow the standard library module `select`.)

Uncertainty of the semi-supervised model × diversity in embedding space (select.*). The
radiologists' labels come back as <data.root>/annotations.csv (path or id, label); the
prepare stage merges them into the labelled set and `dvc repro` retrains.
"""
from pathlib import Path

import numpy as np

from triage.errors import PipelineError
from triage.io import open_live, read_parquet, run_stage, write_csv
from triage.models import load_model, positive_proba
from triage.params import load_params
from triage.select import batch_stats, embed_space, select_batch, to_label_table, uncertainty
from triage.store import read_embeddings

EMBEDDINGS = Path("data/features/embeddings.parquet")
MODEL = Path("data/models/semi_supervised.skops")
CLEAN = Path("data/qc/manifest_clean.parquet")
ASSIGNMENTS = Path("data/cluster/assignments.parquet")
OUT = Path("data/annotation/to_label.csv")


def main() -> None:
    params = load_params()
    s, positive = params["select"], params["data"]["positive_class"]
    backend = params["cluster"]["backend"]  # the library of every vector search
    rows, X, fingerprint = read_embeddings(EMBEDDINGS)
    bundle = load_model(MODEL)
    if bundle["embedding_fingerprint"] != fingerprint.get("fingerprint", ""):
        raise PipelineError(f"model was trained on embedding {bundle['embedding_fingerprint']}, "
                            f"pool vectors are {fingerprint.get('fingerprint')}: run `dvc repro`")
    clean = read_parquet(CLEAN, "clean manifest").drop_duplicates("id")
    assign = read_parquet(ASSIGNMENTS, "cluster assignments")
    rows = rows.merge(clean[["id", "path"]], on="id", how="left", validate="many_to_one")
    rows = rows.merge(assign[["id", "cluster"]].drop_duplicates("id"), on="id", how="left")
    rows["cluster"] = rows["cluster"].fillna(-1).astype(int)
    pool = (rows["split"] == "unlabeled").to_numpy()
    lab = (rows["split"] == "labeled").to_numpy()
    pool_rows = rows[pool].reset_index(drop=True)
    X_pool, X_lab = X[pool], X[lab]
    p = positive_proba(bundle["model"], X_pool, positive) if len(X_pool) else np.zeros(0)
    space = embed_space(np.concatenate([X_lab, X_pool]), s["pca_components"])
    sel = select_batch(X_pool, p, X_lab, batch_size=s["batch_size"], space=space,
                       uncertainty_kind=s["uncertainty"], diversity=s["diversity"],
                       candidates=s["candidates"], pca_components=s["pca_components"],
                       clusters=pool_rows["cluster"].to_numpy(), backend=backend)
    inpool = rows[pool | lab]
    n_all = inpool.groupby("cluster")["id"].size()
    n_lab = inpool[inpool["split"] == "labeled"].groupby("cluster")["id"].size()
    cluster_info = {int(c): (int(n), int(n_lab.get(c, 0))) for c, n in n_all.items()}
    u_all = uncertainty(p, s["uncertainty"])
    table = to_label_table(sel, pool_rows, u_all, s["uncertainty"], s["diversity"], cluster_info)
    write_csv(table, OUT)

    with open_live("select") as live:
        live.log_metric("n_pool", int(pool.sum()), plot=False)
        live.log_metric("n_labeled", int(lab.sum()), plot=False)
        live.log_metric("n_selected", int(len(table)), plot=False)
        if len(sel):
            live.log_metric("uncertainty/selected_mean", round(float(sel["uncertainty"].mean()), 6),
                            plot=False)
            live.log_metric("uncertainty/pool_mean", round(float(u_all.mean()), 6), plot=False)
            live.log_metric("clusters_covered", int(sel["cluster"].nunique()), plot=False)
            Z_pool = space.transform(X_pool)
            stats = batch_stats(Z_pool[sel["index"].to_numpy()], Z_pool, backend)
            for key, value in stats.items():
                live.log_metric(f"diversity/{key}", round(value, 6), plot=False)
    print(f"select: {len(table)} of {int(pool.sum())} unlabelled images proposed for annotation "
          f"({s['uncertainty']} uncertainty, {s['diversity']} diversity) → {OUT}")


if __name__ == "__main__":
    run_stage(main)
