"""Stage `pseudo_label`: label part of the pool.

Writes data/pseudo/pseudo_labels.parquet (id, label, confidence, strategy).
"""
from pathlib import Path

from triage.errors import PipelineError
from triage.io import open_live, read_parquet, run_stage, write_parquet
from triage.params import load_params
from triage.pseudo import pseudo_label_quality, run_strategy
from triage.splits import groups_for
from triage.store import read_embeddings

EMBEDDINGS = Path("data/features/embeddings.parquet")
ASSIGNMENTS = Path("data/cluster/assignments.parquet")
TRUTH = Path("data/demo/pool_truth.parquet")  # hidden truth, only for reporting accuracy
OUT = Path("data/pseudo/pseudo_labels.parquet")


def main() -> None:
    params = load_params()
    p, positive = params["pseudo"], params["data"]["positive_class"]
    rows, X, _ = read_embeddings(EMBEDDINGS)
    lab = (rows["split"] == "labeled").to_numpy()
    pool = (rows["split"] == "unlabeled").to_numpy()
    clusters = read_parquet(ASSIGNMENTS, "cluster assignments")
    if not clusters["id"].equals(rows["id"]):
        raise PipelineError("cluster assignments do not match the embeddings; run `dvc repro`")
    cl = clusters["cluster"].to_numpy()
    y_lab = rows.loc[lab, "label"].to_numpy(dtype=object)
    if positive not in set(y_lab) or len(set(y_lab)) != 2:
        raise PipelineError(f"pseudo_label needs labelled images of two classes including "
                            f"'{positive}', got {sorted(set(y_lab))}")
    pseudo = run_strategy(p, positive, rows.loc[pool, "id"].to_numpy(dtype=object), X[pool],
                          X[lab], y_lab, cl[pool], cl[lab], groups_for(rows.loc[lab, "id"]),
                          backend=params["cluster"]["backend"])
    write_parquet(pseudo, OUT)

    classes = sorted(set(y_lab))
    truth = read_parquet(TRUTH, "pool truth")
    quality = pseudo_label_quality(pseudo, truth, classes)
    with open_live("pseudo_label") as live:
        n_pool = int(pool.sum())
        live.log_metric("n_pool", n_pool, plot=False)
        live.log_metric("n_accepted", len(pseudo), plot=False)
        live.log_metric("coverage", round(len(pseudo) / n_pool, 6) if n_pool else 0.0, plot=False)
        live.log_metric("noise_excluded", int((cl[pool] < 0).sum()), plot=False)
        for cls in classes:
            live.log_metric(f"accepted/{cls}", int((pseudo["label"] == cls).sum()), plot=False)
        if len(pseudo):
            live.log_metric("accepted_positive_share",
                            round(float((pseudo["label"] == positive).mean()), 6), plot=False)
            live.log_metric("mean_confidence", round(float(pseudo["confidence"].mean()), 6),
                            plot=False)
        for key, value in quality.items():
            live.log_metric(f"truth/{key}", round(value, 6), plot=False)
        live.log_param("strategy", p["strategy"])
    print(f"pseudo_label: {len(pseudo)}/{int(pool.sum())} accepted ({p['strategy']})")


if __name__ == "__main__":
    run_stage(main)
