"""Batch inference: a folder of new images → predictions CSV.

    python scripts/predict.py path/to/new_images [--out data/predictions/predictions.csv]

Per image: id (sha256), path, probability (P(positive class)), decision at the model's
operating threshold, needs_review (|P - threshold| <= inference.review_margin, or QC
failed), qc_status ('ok' or the quarantine reason) and qc_detail. Runs the pipeline's
per-image QC and the embedding with the exact fingerprint the model was trained with;
a mismatch stops with a clear error (exit 1). Reads params.yaml (inference.*, embed.*,
qc.*). Prints counts only, never file names.

Each run appends one line to the audit trail ($TRIAGE_AUDIT_LOG, else params
inference.audit_log, else ~/.local/state/triage/audit.jsonl; triage.audit_trail): user, host,
the model's sha256 prefix, image count, counts per QC status and decision, the output's
sha256 — no file names. If that line cannot be written the run fails (exit 1) and writes no
output (checked before the images are read, and again when the output is renamed into place).
"""
import argparse
import hashlib
import time

from triage.audit_trail import AuditError, AuditTrail, file_sha256, user_and_host
from triage.checkout import require_own_checkout
from triage.errors import PipelineError
from triage.inference import Predictor, image_files
from triage.io import atomic_path, neutralise_formulas, run_stage
from triage.params import load_params


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="folder of new images (searched recursively)")
    ap.add_argument("--out", default="data/predictions/predictions.csv",
                    help="output CSV (default: %(default)s; data/ is not committed to git)")
    ap.add_argument("--model", default=None, help="model bundle (default: params inference.model)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--embeddings", default="data/features/embeddings.parquet",
                    help="training embeddings whose stored fingerprint rebuilds the embedder "
                         "(optional; params embed.* otherwise)")
    return ap.parse_args(argv)


def batch_record(df, model_sha256: str, output_sha256: str, seconds: float) -> dict:
    """The run's audit line: counts and hashes only (no paths, ids or file names)."""
    decisions = df["decision"].fillna("none").astype(str).value_counts()
    return {"event": "batch", **user_and_host(), "model_sha256": model_sha256,
            "images": int(len(df)),
            "qc_status": {str(k): int(v) for k, v in df["qc_status"].value_counts().items()},
            "decision": {str(k): int(v) for k, v in decisions.items()},
            "needs_review": int(df["needs_review"].sum()), "output_sha256": output_sha256,
            "duration_ms": round(seconds * 1000, 1)}


def main(argv=None) -> None:
    require_own_checkout(__file__)
    args = parse(argv)
    params = load_params(args.params)
    t0 = time.perf_counter()
    trail = AuditTrail.from_params(params)
    try:
        trail.check()  # an unauditable run stops before reading any image
    except AuditError as exc:
        raise PipelineError(f"{exc}. Every run is audited: nothing was predicted.") from None
    model = args.model or params["inference"]["model"]
    files = image_files(args.folder)
    predictor = Predictor.from_files(model, params, embeddings_path=args.embeddings)
    df = predictor.predict_paths([str(f) for f in files], [f.as_posix() for f in files])
    # write_csv's steps, with the audit line written before the CSV is renamed into place
    try:
        with atomic_path(args.out) as tmp:
            neutralise_formulas(df).to_csv(tmp, index=False, lineterminator="\n")
            trail.write(batch_record(df, file_sha256(model, 12),
                                     hashlib.sha256(tmp.read_bytes()).hexdigest(),
                                     time.perf_counter() - t0))
    except AuditError as exc:
        raise PipelineError(f"{exc}. Every run is audited: no predictions were written "
                            f"({args.out} is unchanged).") from None
    n_ok = int((df["qc_status"] == "ok").sum())
    n_pos = int((df["decision"] == predictor.positive).sum())
    print(f"predict: {len(df)} files, {n_ok} passed QC, {n_pos} flagged {predictor.positive} "
          f"(threshold {predictor.threshold:.4f}), {int(df['needs_review'].sum())} need review "
          f"→ {args.out}")


if __name__ == "__main__":
    run_stage(main)
