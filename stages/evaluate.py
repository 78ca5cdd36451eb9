"""Stage `evaluate`: both models on the held-out test set, with CIs, deltas and plots."""
import math
from pathlib import Path

import pandas as pd

from triage.errors import PipelineError
from triage.finetune_results import OUT_DIR as FINETUNE_DIR
from triage.finetune_results import finetuned_scores, read_finetune_predictions
from triage.io import open_live, run_stage, write_parquet
from triage.metrics import evaluate_scores, paired_delta
from triage.models import load_model, positive_proba
from triage.params import load_params
from triage.store import read_embeddings

EMBEDDINGS = Path("data/features/embeddings.parquet")
MODELS = Path("data/models")
PREDICTIONS = Path("data/evaluate/test_predictions.parquet")
MODEL_NAMES = ("baseline", "semi_supervised")


def log_all(live, prefix: str, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            live.log_metric(f"{prefix}/{key}", round(float(value), 6) if isinstance(value, float)
                            else value, plot=False)


def log_model(live, name: str, test_rows: pd.DataFrame, y, p, threshold: float, ev: dict,
              kw: dict) -> pd.DataFrame:
    """Metrics with CIs and the four sklearn plots of one model; its prediction rows."""
    log_all(live, name, evaluate_scores(y, p, threshold, **kw))
    decision = (p >= threshold).astype(int)
    live.log_sklearn_plot("roc", y, p, name=f"roc/{name}.json")
    live.log_sklearn_plot("precision_recall", y, p, name=f"precision_recall/{name}.json")
    live.log_sklearn_plot("confusion_matrix", y, decision, name=f"confusion/{name}.json")
    live.log_sklearn_plot("calibration", y, p, name=f"calibration/{name}.json",
                          n_bins=ev["calibration_bins"])
    return pd.DataFrame({"id": test_rows["id"].to_numpy(), "model": name,
                         "label": test_rows["label"].to_numpy(), "proba": p,
                         "flagged": decision.astype(bool)})


def main() -> None:
    params = load_params()
    ev, positive = params["evaluate"], params["data"]["positive_class"]
    rows, X, fingerprint = read_embeddings(EMBEDDINGS)
    test = (rows["split"] == "test").to_numpy()
    if test.sum() == 0:
        raise PipelineError("no test images passed QC: nothing to evaluate")
    y = (rows.loc[test, "label"] == positive).astype(int).to_numpy()
    if y.min() == y.max():
        raise PipelineError("the test set holds a single class: ROC-AUC is undefined")
    kw = dict(n_bootstrap=ev["n_bootstrap"], level=ev["ci_level"], seed=ev["seed"],
              n_bins=ev["calibration_bins"])
    probs, thresholds, preds = {}, {}, []
    with open_live("evaluate") as live:
        for name in MODEL_NAMES:
            bundle = load_model(MODELS / f"{name}.skops")
            if bundle["embedding_fingerprint"] != fingerprint.get("fingerprint", ""):
                raise PipelineError(f"model {name} was trained on embedding "
                                    f"{bundle['embedding_fingerprint']}, test vectors are "
                                    f"{fingerprint.get('fingerprint')}: run `dvc repro`")
            p = positive_proba(bundle["model"], X[test], positive)
            probs[name], thresholds[name] = p, bundle["threshold"]
            preds.append(log_model(live, name, rows.loc[test], y, p, bundle["threshold"], ev, kw))
        # The end-to-end fine-tuned network (finetune stage), when enabled: same metrics,
        # CIs and plots; its threshold reaches the target sensitivity on its labelled
        # out-of-fold probabilities (never on test).
        ft = read_finetune_predictions(FINETUNE_DIR)
        if ft is not None:
            p, threshold = finetuned_scores(ft, rows.loc[test, "id"].tolist(), positive,
                                            ev["target_sensitivity"])
            preds.append(log_model(live, "finetuned", rows.loc[test], y, p, threshold, ev, kw))
        delta = paired_delta(y, probs["baseline"], probs["semi_supervised"],
                             thresholds["baseline"], thresholds["semi_supervised"], **kw)
        log_all(live, "delta", delta)
        live.log_metric("n_test", int(test.sum()), plot=False)
    write_parquet(pd.concat(preds, ignore_index=True), PREDICTIONS)
    b, s = probs["baseline"], probs["semi_supervised"]
    print(f"evaluate: n_test={int(test.sum())} ROC-AUC baseline "
          f"{evaluate_scores(y, b, thresholds['baseline'], n_bootstrap=0)['roc_auc']:.3f} → "
          f"semi-supervised {evaluate_scores(y, s, thresholds['semi_supervised'], n_bootstrap=0)['roc_auc']:.3f}")


if __name__ == "__main__":
    run_stage(main)
