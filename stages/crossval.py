"""Stage `crossval`: leak-free repeated stratified K-fold of the whole semi-supervised chain.

In each fold the held-out labelled images are hidden entirely (labels and images: they
are not put in the pool) and the clusterer, pseudo-labeller and both classifiers are
refitted from the fold's training labels + the pool. Logs held-out ROC-AUC of the
baseline and of the semi-supervised model (mean, 95 % t-interval over folds) and their
paired delta (Nadeau-Bengio corrected t-interval and p-value) to metrics/crossval.
"""
import math
from pathlib import Path

from triage.crossval import crossval_semisup
from triage.io import open_live, read_parquet, run_stage
from triage.params import load_params
from triage.splits import groups_for
from triage.store import read_embeddings

EMBEDDINGS = Path("data/features/embeddings.parquet")
TRUTH = Path("data/demo/pool_truth.parquet")  # hidden pool truth (demo): pseudo-label accuracy


def main() -> None:
    params = load_params()
    p, positive = params["pseudo"], params["data"]["positive_class"]
    rows, X, _ = read_embeddings(EMBEDDINGS)
    rows["group"] = groups_for(rows["id"])  # folds keep a split group on one side
    truth = read_parquet(TRUTH, "pool truth")
    cv = params["crossval"]
    per_fold, s = crossval_semisup(rows, X, params, positive, cv["folds"], cv["repeats"],
                                   cv["seed"], params["evaluate"]["ci_level"],
                                   truth=truth if len(truth) else None)
    with open_live("crossval") as live:
        for model in ("baseline", "semi_supervised", "delta"):
            for key, value in s[model].items():
                if key == "p_value" and model != "delta":
                    continue  # only the delta's test (delta = 0) means something
                if not (isinstance(value, float) and math.isnan(value)):
                    live.log_metric(f"{model}/roc_auc_{key}", round(float(value), 6), plot=False)
        for key in ("n_folds", "folds", "repeats"):
            live.log_metric(key, s[key], plot=False)
        live.log_metric("n_pseudo_mean", round(s["n_pseudo_mean"], 3), plot=False)
        if "pseudo_accuracy_mean" in s:
            live.log_metric("truth/pseudo_accuracy_mean", round(s["pseudo_accuracy_mean"], 6),
                            plot=False)
        live.log_plot("folds", per_fold[["fold", "baseline", "semi_supervised", "delta"]].round(6),
                      x="fold", y=["baseline", "semi_supervised"], template="linear",
                      title="Held-out ROC-AUC per fold (labelled set)")
        live.log_param("strategy", p["strategy"])
    d = s["delta"]
    print(f"crossval: {s['n_folds']} folds ROC-AUC baseline {s['baseline']['mean']:.3f} → "
          f"semi-supervised {s['semi_supervised']['mean']:.3f}; delta {d['mean']:+.3f} "
          f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] (Nadeau-Bengio), p={d['p_value']:.3f}")


if __name__ == "__main__":
    run_stage(main)
