"""The finetune stage's outputs as the rest of the pipeline reads them: file layout,
its predictions, and their operating threshold. No torch: evaluate reads these without
depending on (or re-running for) the FixMatch training code.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import PipelineError

OUT_DIR = Path("data/finetune")
MODEL_FILE = "model.pt"
PREDICTIONS_FILE = "predictions.parquet"
SUMMARY_FILE = "summary.json"
DISABLED_FILE = "disabled.json"


def read_finetune_predictions(out_dir: str | Path = OUT_DIR) -> pd.DataFrame | None:
    """The finetune stage's predictions, or None when the stage ran disabled (or, outside
    DVC, never ran: its folder is absent)."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or ((out_dir / DISABLED_FILE).is_file()
                                and not (out_dir / PREDICTIONS_FILE).is_file()):
        return None
    path = out_dir / PREDICTIONS_FILE
    if not path.is_file():
        raise PipelineError(f"finetune output missing: {path} (run `dvc repro finetune`)")
    return pd.read_parquet(path)


def finetuned_scores(preds: pd.DataFrame, test_ids, positive: str, target_sensitivity: float):
    """(test probabilities aligned to ``test_ids``, threshold from the labelled OOF scores)."""
    from .metrics import threshold_for_sensitivity

    oof = preds[preds["kind"] == "oof"]
    y_oof = (oof["label"] == positive).astype(int).to_numpy()
    threshold = threshold_for_sensitivity(y_oof, oof["proba"].to_numpy(), target_sensitivity)
    test = preds[preds["kind"] == "test"].set_index("id")["proba"]
    missing = [i for i in test_ids if i not in test.index]
    if missing:
        raise PipelineError(f"finetune predictions lack {len(missing)} test images (e.g. "
                            f"{missing[0]}): run `dvc repro finetune`")
    return test.loc[list(test_ids)].to_numpy(dtype=float), float(threshold)
