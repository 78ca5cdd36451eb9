"""Stage `report`: error analysis page and model card, regenerated every run.

The card's model version is the sha256 of the model files this stage depends on in
dvc.yaml (never a date, host or commit: the outputs are hashed in dvc.lock)."""
import json
from pathlib import Path

from triage.audit import read_review
from triage.io import atomic_path, read_parquet, run_stage
from triage.params import load_params
from triage.report import Groups, error_table, read_versions, render_errors_html, render_model_card
from triage.store import read_embeddings

EMBEDDINGS = Path("data/features/embeddings.parquet")
CLEAN = Path("data/qc/manifest_clean.parquet")
ASSIGNMENTS = Path("data/cluster/assignments.parquet")
PREDICTIONS = Path("data/evaluate/test_predictions.parquet")
REVIEW = Path("data/annotation/to_review.csv")  # stage audit
METRICS = ("evaluate", "qc", "pseudo_label", "train", "embed")
ERRORS_HTML = Path("reports/errors.html")
MODEL_CARD = Path("reports/model_card.md")
DVC_YAML = Path("dvc.yaml")


def negative_class(labels, positive: str) -> str:
    """The other class's name (the labelled images' labels), or "not <positive>"."""
    others = sorted({str(v) for v in labels if isinstance(v, str) and v != positive})
    return others[0] if len(others) == 1 else f"not {positive}"


def main() -> None:
    params = load_params()
    positive = params["data"]["positive_class"]
    rows, X, _ = read_embeddings(EMBEDDINGS)
    paths = read_parquet(CLEAN, "clean manifest").drop_duplicates("id").set_index("id")["path"]
    rows["path"] = rows["id"].map(paths)
    clusters = read_parquet(ASSIGNMENTS, "cluster assignments")
    clusters = clusters.drop_duplicates("id").set_index("id")["cluster"]
    preds = read_parquet(PREDICTIONS, "test predictions")
    metrics = {s: json.loads(Path(f"metrics/{s}/metrics.json").read_text()) for s in METRICS}
    embed_params = Path("metrics/embed/params.yaml")
    if embed_params.is_file():
        import yaml

        metrics["embed"].update(yaml.safe_load(embed_params.read_text()) or {})
    metrics["embed"]["feature_dim"] = int(X.shape[1])  # the backbone's, read from the data
    thresholds = {m: metrics["evaluate"][m]["threshold"] for m in ("semi_supervised", "baseline")}
    backend = params["cluster"]["backend"]  # the nearest-labelled search (cluster.backend)
    errors = {m: error_table(preds[preds["model"] == m], rows, X, clusters, positive, thr,
                             backend)
              for m, thr in thresholds.items()}
    groups = Groups(n=int(clusters[clusters >= 0].nunique()),
                    method=params.get("cluster", {}).get("method"))
    negative = negative_class(rows["label"], positive)
    review = read_review(REVIEW)
    # the manifest's path (the CSV's is written spreadsheet-safe), the CSV's if it has none
    review["path"] = review["id"].map(paths).fillna(review["path"])
    html = render_errors_html(errors, thresholds, metrics["evaluate"]["n_test"], positive,
                              negative=negative, groups=groups, review=review)
    with atomic_path(ERRORS_HTML) as tmp:
        tmp.write_text(html, encoding="utf-8")
    card = render_model_card(params, metrics, errors["semi_supervised"],
                             versions=read_versions(DVC_YAML, "report"), groups=groups)
    with atomic_path(MODEL_CARD) as tmp:
        tmp.write_text(card, encoding="utf-8")
    n = {m: len(e) for m, e in errors.items()}
    print(f"report: {ERRORS_HTML} ({n['semi_supervised']} semi-supervised errors), {MODEL_CARD}")


if __name__ == "__main__":
    run_stage(main)
