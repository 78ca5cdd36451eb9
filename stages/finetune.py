"""Stage `finetune`: ResNet18 trained end to end on the images (FixMatch-style consistency
on the unlabelled pool), out-of-fold threshold on the labelled set, test probabilities.

Off by default (finetune.enabled: false): the stage then only writes
data/finetune/disabled.json, in milliseconds, so `dvc repro` stays fast and consistent.
"""
import time
from pathlib import Path

from triage.backbone import check_weights_dependency
from triage.finetune_results import DISABLED_FILE, MODEL_FILE, OUT_DIR, PREDICTIONS_FILE, SUMMARY_FILE
from triage.io import open_live, read_parquet, reset_dir, run_stage, write_json, write_parquet
from triage.params import load_params

CLEAN = Path("data/qc/manifest_clean.parquet")


def main() -> None:
    params = load_params()
    f = params["finetune"]
    reset_dir(OUT_DIR)
    if not f["enabled"]:
        write_json({"stage": "finetune", "enabled": False,
                    "enable_with": "dvc exp run -S finetune.enabled=true"}, OUT_DIR / DISABLED_FILE)
        with open_live("finetune") as live:
            live.log_metric("enabled", 0, plot=False)
        print("finetune: disabled (finetune.enabled: false); wrote the marker only")
        return

    from triage.finetune import FinetuneConfig, model_bundle, run_finetune
    from triage.metrics import point_metrics
    from triage.torch_utils import save_checkpoint

    check_weights_dependency(f["weights"], "finetune.weights")
    positive = params["data"]["positive_class"]
    target = params["evaluate"]["target_sensitivity"]
    cfg = FinetuneConfig.from_params(f)
    rows = read_parquet(CLEAN, "clean manifest")
    start = time.perf_counter()
    result = run_finetune(rows, cfg, positive, target,
                          log=lambda r: print(f"finetune: epoch {r['epoch']} " + " ".join(
                              f"{k}={v:.4f}" for k, v in r.items() if k != "epoch"), flush=True))
    seconds = time.perf_counter() - start
    labels = sorted({str(v) for v in rows.loc[rows["split"] == "labeled", "label"]})
    negative = next((c for c in labels if c != positive), "negative")
    save_checkpoint(model_bundle(result, cfg, positive, negative, target), OUT_DIR / MODEL_FILE)
    preds = result["predictions"]
    write_parquet(preds, OUT_DIR / PREDICTIONS_FILE)
    oof = preds[preds["kind"] == "oof"]
    y_oof = (oof["label"] == positive).astype(int).to_numpy()
    m = point_metrics(y_oof, oof["proba"].to_numpy(), result["threshold"])
    write_json({"stage": "finetune", "enabled": True, "threshold": result["threshold"],
                "n_labeled": result["n_labeled"], "n_pool": result["n_pool"],
                "n_test": result["n_test"], "weights": cfg.weights,
                "consistency": cfg.consistency}, OUT_DIR / SUMMARY_FILE)
    hist = result["history"]
    with open_live("finetune") as live:
        live.log_metric("enabled", 1, plot=False)
        for key in ("n_labeled", "n_pool", "n_test"):
            live.log_metric(key, int(result[key]), plot=False)
        live.log_metric("threshold", round(result["threshold"], 6), plot=False)
        for key in ("roc_auc", "sensitivity", "specificity"):
            live.log_metric(f"oof_{key}", round(m[key], 6), plot=False)
        for key, value in hist[-1].items():
            if key != "epoch":
                live.log_metric(f"final/{key}", value, plot=False)
        live.log_plot("losses", hist, x="epoch", y=["loss", "loss_x", "loss_u"],
                      template="linear", title="Fine-tuning loss per epoch (final model)")
        live.log_plot("pseudo_labels", hist, x="epoch", y=["mask_rate", "pseudo_positive_share"],
                      template="linear",
                      title="Share of unlabelled images above the threshold, and their positive share")
    print(f"finetune: {cfg.epochs} epochs x {cfg.cv_folds + 1} fits on {result['device']} in "
          f"{seconds:.0f}s; OOF ROC-AUC {m['roc_auc']:.3f}, threshold {result['threshold']:.4f}")


if __name__ == "__main__":
    run_stage(main)
