"""Stage `audit`: labelled images whose label the out-of-fold model doubts → to_review.csv.

cleanlab's confident learning on the baseline model's out-of-fold P(positive) (train
stage; labels only, no pseudo-labels). data/annotation/to_review.csv lists the flagged
images, most suspicious first (score = 1 - P(given label), higher = more likely wrong),
for a second reader; nothing is relabelled here (docs/active_learning.md).
"""
from pathlib import Path

from triage.audit import audit_labels, audit_stats, baseline_oof, to_review
from triage.io import open_live, read_parquet, run_stage, write_csv
from triage.params import load_params

OOF = Path("data/models/oof_predictions.parquet")
CLEAN = Path("data/qc/manifest_clean.parquet")
OUT = Path("data/annotation/to_review.csv")


def main() -> None:
    params = load_params()
    a, positive = params["audit"], params["data"]["positive_class"]
    oof = baseline_oof(read_parquet(OOF, "out-of-fold predictions"))
    paths = read_parquet(CLEAN, "clean manifest").drop_duplicates("id").set_index("id")["path"]
    audit = audit_labels(oof["id"], oof["label"], oof["proba"], positive, a["filter_by"])
    review = to_review(audit, paths, a["max_rows"])
    write_csv(review, OUT)
    stats = audit_stats(audit, review)
    with open_live("audit") as live:
        live.log_param("method", "cleanlab.filter.find_label_issues")
        live.log_param("filter_by", a["filter_by"])
        live.log_param("score", "1 - self_confidence (higher = more likely mislabelled)")
        for key, value in stats.items():
            live.log_metric(key, value, plot=False)
    print(f"audit: {stats['n_flagged']} of {stats['n_audited']} labelled images flagged "
          f"({a['filter_by']}); {len(review)} to review → {OUT}")


if __name__ == "__main__":
    run_stage(main)
