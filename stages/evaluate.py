"""Stage `evaluate`: both models on the held-out test set, with CIs, deltas and plots.

Triage KPI (``<model>/triage/s90|s95|s98``): for each of evaluate.triage_targets, a threshold
reaching it on the out-of-fold scores train wrote (data/models/oof_predictions.parquet;
the finetuned model's own OOF rows), then on test the sensitivity, the share set aside
(predicted negative) and the positives missed among them, with Wilson CIs.
"""
import math
from pathlib import Path

import pandas as pd

from triage.errors import PipelineError
from triage.finetune_results import OUT_DIR as FINETUNE_DIR
from triage.finetune_results import finetuned_scores, read_finetune_predictions
from triage.io import open_live, read_parquet, run_stage, write_parquet
from triage.metrics import (
    evaluate_scores,
    paired_delta,
    threshold_for_sensitivity,
    triage_at_targets,
    triage_key,
)
from triage.models import load_model, positive_proba
from triage.params import load_params
from triage.store import read_embeddings

EMBEDDINGS = Path("data/features/embeddings.parquet")
MODELS = Path("data/models")
PREDICTIONS = Path("data/evaluate/test_predictions.parquet")
OOF = MODELS / "oof_predictions.parquet"
MODEL_NAMES = ("baseline", "semi_supervised")


def log_all(live, prefix: str, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            live.log_metric(f"{prefix}/{key}", round(float(value), 6) if isinstance(value, float)
                            else value, plot=False)


def oof_scores(oof: pd.DataFrame, name: str, positive: str):
    """(labels 0/1, probabilities) of one model's out-of-fold rows (train's parquet)."""
    rows = oof[oof["model"] == name]
    if rows.empty:
        raise PipelineError(f"{OOF} has no out-of-fold rows for model {name}: run `dvc repro train`")
    return (rows["label"] == positive).astype(int).to_numpy(), rows["proba"].to_numpy(dtype=float)


def log_triage(live, name: str, triage: dict) -> None:
    for key, values in triage.items():
        log_all(live, f"{name}/triage/{key}", values)


def log_model(live, name: str, test_rows: pd.DataFrame, y, p, threshold: float, ev: dict,
              kw: dict, triage: dict) -> pd.DataFrame:
    """Metrics with CIs, the triage KPI and the four sklearn plots of one model; its
    prediction rows."""
    log_all(live, name, evaluate_scores(y, p, threshold, **kw))
    log_triage(live, name, triage)
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
    targets, level = ev["triage_targets"], ev["ci_level"]
    oof = read_parquet(OOF, "out-of-fold predictions")
    probs, thresholds, preds, triage = {}, {}, [], {}
    with open_live("evaluate") as live:
        for name in MODEL_NAMES:
            bundle = load_model(MODELS / f"{name}.skops")
            if bundle["embedding_fingerprint"] != fingerprint.get("fingerprint", ""):
                raise PipelineError(f"model {name} was trained on embedding "
                                    f"{bundle['embedding_fingerprint']}, test vectors are "
                                    f"{fingerprint.get('fingerprint')}: run `dvc repro`")
            p = positive_proba(bundle["model"], X[test], positive)
            probs[name], thresholds[name] = p, bundle["threshold"]
            y_oof, p_oof = oof_scores(oof, name, positive)
            # the same OOF scores train set the bundle's threshold on (else a stale file)
            if "target_sensitivity" in bundle:
                again = threshold_for_sensitivity(y_oof, p_oof, bundle["target_sensitivity"])
                if not math.isclose(again, bundle["threshold"], rel_tol=1e-9, abs_tol=1e-12):
                    raise PipelineError(f"{OOF} does not reproduce model {name}'s threshold "
                                        f"({again} vs {bundle['threshold']}): run `dvc repro train`")
            triage[name] = triage_at_targets(y_oof, p_oof, y, p, targets, level)
            preds.append(log_model(live, name, rows.loc[test], y, p, bundle["threshold"], ev, kw,
                                   triage[name]))
        # The end-to-end fine-tuned network (finetune stage), when enabled: same metrics,
        # CIs and plots; its threshold reaches the target sensitivity on its labelled
        # out-of-fold probabilities (never on test).
        ft = read_finetune_predictions(FINETUNE_DIR)
        if ft is not None:
            ids = rows.loc[test, "id"].tolist()
            p, threshold = finetuned_scores(ft, ids, positive, ev["target_sensitivity"])
            ft_oof = ft[ft["kind"] == "oof"]
            triage["finetuned"] = triage_at_targets(
                (ft_oof["label"] == positive).astype(int).to_numpy(),
                ft_oof["proba"].to_numpy(dtype=float), y, p, targets, level)
            preds.append(log_model(live, "finetuned", rows.loc[test], y, p, threshold, ev, kw,
                                   triage["finetuned"]))
        delta = paired_delta(y, probs["baseline"], probs["semi_supervised"],
                             thresholds["baseline"], thresholds["semi_supervised"], **kw)
        log_all(live, "delta", delta)
        live.log_metric("n_test", int(test.sum()), plot=False)
    write_parquet(pd.concat(preds, ignore_index=True), PREDICTIONS)
    b, s = probs["baseline"], probs["semi_supervised"]
    print(f"evaluate: n_test={int(test.sum())} ROC-AUC baseline "
          f"{evaluate_scores(y, b, thresholds['baseline'], n_bootstrap=0)['roc_auc']:.3f} → "
          f"semi-supervised {evaluate_scores(y, s, thresholds['semi_supervised'], n_bootstrap=0)['roc_auc']:.3f}")
    for target in targets:
        k = triage_key(target)
        t = triage["semi_supervised"][k]
        print(f"evaluate: semi-supervised at the {target:.2f} target (OOF threshold "
              f"{t['threshold']:.4g}): test sensitivity {t['sensitivity']:.3f}, set aside "
              f"{100 * t['set_aside']:.1f} %, missed {t['missed']}")


if __name__ == "__main__":
    run_stage(main)
