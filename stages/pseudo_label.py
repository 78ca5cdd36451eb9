"""Stage `pseudo_label`: accept confident labels for pool images → data/pseudo/pseudo_labels.parquet."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.embed import read_embeddings  # noqa: E402
from triage.errors import PipelineError  # noqa: E402
from triage.io import open_live, read_parquet, run_stage, write_parquet  # noqa: E402
from triage.params import load_params  # noqa: E402
from triage.pseudo import (ClusterVotePseudoLabeler, ConfidencePseudoLabeler,  # noqa: E402
                           pseudo_label_quality)

EMBEDDINGS = Path("data/features/embeddings.parquet")
ASSIGNMENTS = Path("data/cluster/assignments.parquet")
TRUTH = Path("data/demo/pool_truth.parquet")  # hidden truth, only for reporting accuracy
OUT = Path("data/pseudo/pseudo_labels.parquet")


def main() -> None:
    params = load_params()
    p = params["pseudo"]
    rows, X, _ = read_embeddings(EMBEDDINGS)
    lab = (rows["split"] == "labeled").to_numpy()
    pool = (rows["split"] == "unlabeled").to_numpy()
    if p["strategy"] == "cluster_vote":
        clusters = read_parquet(ASSIGNMENTS, "cluster assignments")
        if not clusters["id"].equals(rows["id"]):
            raise PipelineError("cluster assignments do not match the embeddings; run `dvc repro`")
        cl = clusters["cluster"].to_numpy()
        labeler = ClusterVotePseudoLabeler(p["min_purity"], p["min_support"], p["balance_classes"])
        pseudo = labeler.fit_predict(rows.loc[pool, "id"], cl[pool], cl[lab], rows.loc[lab, "label"])
    else:
        labeler = ConfidencePseudoLabeler(p["confidence_threshold"], p["C"], p["balance_classes"],
                                          random_state=params["train"]["seed"])
        pseudo = labeler.fit_predict(rows.loc[pool, "id"], X[pool], X[lab], rows.loc[lab, "label"])
    write_parquet(pseudo, OUT)

    classes = sorted(rows.loc[lab, "label"].unique())
    truth = read_parquet(TRUTH, "pool truth")
    quality = pseudo_label_quality(pseudo, truth, classes)
    with open_live("pseudo_label") as live:
        n_pool = int(pool.sum())
        live.log_metric("n_pool", n_pool, plot=False)
        live.log_metric("n_accepted", len(pseudo), plot=False)
        live.log_metric("coverage", round(len(pseudo) / n_pool, 6) if n_pool else 0.0, plot=False)
        for cls in classes:
            live.log_metric(f"accepted/{cls}", int((pseudo["label"] == cls).sum()), plot=False)
        for key, value in quality.items():
            live.log_metric(f"truth/{key}", round(value, 6), plot=False)
        live.log_param("strategy", p["strategy"])
    print(f"pseudo_label: {len(pseudo)}/{int(pool.sum())} accepted ({p['strategy']})")


if __name__ == "__main__":
    run_stage(main)
