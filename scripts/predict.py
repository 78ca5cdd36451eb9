"""Batch inference: a folder of new images → predictions CSV.

    python scripts/predict.py path/to/new_images [--out data/predictions/predictions.csv]

Per image: id (sha256), path, probability (P(positive class)), decision at the model's
operating threshold, needs_review (|P - threshold| <= inference.review_margin, or QC
failed), qc_status ('ok' or the quarantine reason) and qc_detail. Runs the pipeline's
per-image QC and the embedding with the exact fingerprint the model was trained with;
a mismatch stops with a clear error (exit 1). Reads params.yaml (inference.*, embed.*,
qc.*). Prints counts only, never file names.
"""
import argparse

from triage.checkout import require_own_checkout
from triage.inference import Predictor, image_files
from triage.io import run_stage, write_csv
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


def main(argv=None) -> None:
    require_own_checkout(__file__)
    args = parse(argv)
    params = load_params(args.params)
    model = args.model or params["inference"]["model"]
    files = image_files(args.folder)
    predictor = Predictor.from_files(model, params, embeddings_path=args.embeddings)
    df = predictor.predict_paths([str(f) for f in files], [f.as_posix() for f in files])
    write_csv(df, args.out)
    n_ok = int((df["qc_status"] == "ok").sum())
    n_pos = int((df["decision"] == predictor.positive).sum())
    print(f"predict: {len(df)} files, {n_ok} passed QC, {n_pos} flagged {predictor.positive} "
          f"(threshold {predictor.threshold:.4f}), {int(df['needs_review'].sum())} need review "
          f"→ {args.out}")


if __name__ == "__main__":
    run_stage(main)
