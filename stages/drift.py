"""Stage `drift`: a batch of images vs the training pool → metrics/drift, reports/drift.html.

The batch is the test split (drift.batch: "") or a folder of new images (drift.batch:
path), which is QC'd and embedded with the model's exact embedding fingerprint. Ad hoc,
outside DVC (nothing tracked is written):

    python -m stages.drift --batch path/to/folder --report /tmp/drift.html --metrics /tmp/drift.json

Folder names can carry patient identifiers, so the folder path is never printed, logged
(DVCLive param) or put in the report: a folder batch is named by :func:`batch_label`
(file count and a short digest of the images' content ids).
"""
import argparse
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from triage.drift import compare, flat_metrics, image_stats, prevalence_matched, render_html, subsample
from triage.errors import PipelineError
from triage.inference import Predictor, image_files
from triage.io import atomic_path, open_live, read_parquet, run_stage, write_json
from triage.models import load_model, ood_flags, positive_proba
from triage.params import load_params
from triage.store import read_embeddings

EMBEDDINGS = Path("data/features/embeddings.parquet")
CLEAN = Path("data/qc/manifest_clean.parquet")
REPORT = Path("reports/drift.html")
N_TYPICAL = 8


def parse(argv=None):
    ap = argparse.ArgumentParser(description="drift of a batch vs the training pool")
    ap.add_argument("--batch", default=None, help="folder of new images (default: params drift.batch)")
    ap.add_argument("--report", default=str(REPORT))
    ap.add_argument("--metrics", default=None,
                    help="write metrics to this JSON file instead of metrics/drift (DVCLive)")
    return ap.parse_args(argv)


def batch_label(n_files: int, image_ids) -> str:
    """Non-identifying name of a folder batch: its file count and a short digest of the
    images' content ids (sha256 of the bytes), never the folder path or file names."""
    ids = sorted(str(i) for i in image_ids if isinstance(i, str) and i)
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    return f"folder batch ({n_files} files, content {digest})"


@dataclass
class Batch:
    """The images compared with the pool: vectors, paths, P(positive), and how they came."""

    name: str
    X: np.ndarray
    paths: list
    proba: np.ndarray
    bundle: dict
    extra: dict = field(default_factory=dict)
    n_files: int | None = None
    n_failed: int = 0
    ids: list = field(default_factory=list)   # content ids (sha256), for the page's captions
    split: str = ""                           # what the page calls the batch's images


def folder_batch(folder: str, params: dict, rng: np.random.Generator) -> Batch:
    """New images: QC'd, embedded and scored as the batch CLI does (same embedder)."""
    d = params["drift"]
    predictor = Predictor.from_files(params["inference"]["model"], params, embeddings_path=EMBEDDINGS)
    if not Path(folder).is_dir():  # the path itself is not echoed (see module docstring)
        raise PipelineError("drift.batch: the batch folder does not exist or is not a folder "
                            "(check drift.batch / --batch)")
    files = image_files(folder)
    df, X_ok = predictor.predict_paths_with_vectors([str(f) for f in files])
    ok = (df["qc_status"] == "ok").to_numpy()
    n_files, n_failed = len(files), int((~ok).sum())
    if ok.sum() < 5:
        raise PipelineError(f"drift.batch: only {int(ok.sum())} images of the {n_files} files "
                            f"in the drift.batch folder passed QC (need at least 5 to compare "
                            f"distributions)")
    ok_paths = [str(f) for f, good in zip(files, ok) if good]
    ok_ids = df.loc[ok, "id"].tolist()
    take = subsample(len(ok_paths), d["max_images"], rng)
    # never the folder path as the name: it may identify a patient
    return Batch(batch_label(n_files, df["id"]), X_ok[take], [ok_paths[i] for i in take],
                 df.loc[ok, "probability"].to_numpy(dtype=float)[take], predictor.bundle,
                 {"n_files": n_files, "qc_failed": n_failed}, n_files, n_failed,
                 [ok_ids[i] for i in take], "new batch")


def test_split_batch(rows, X, fingerprint: dict, params: dict, rng: np.random.Generator) -> Batch:
    """The pipeline's own test split, scored by the served model."""
    bundle = load_model(params["inference"]["model"])
    if bundle["embedding_fingerprint"] != fingerprint.get("fingerprint", ""):
        raise PipelineError(f"model was trained on embedding {bundle['embedding_fingerprint']}, "
                            f"vectors are {fingerprint.get('fingerprint')}: run `dvc repro`")
    test = np.flatnonzero((rows["split"] == "test").to_numpy())
    if len(test) < 5:
        raise PipelineError("drift: fewer than 5 test images to compare (set drift.batch)")
    test = test[subsample(len(test), params["drift"]["max_images"], rng)]
    proba = positive_proba(bundle["model"], X[test], params["data"]["positive_class"])
    return Batch("test split", X[test], rows.loc[test, "path"].tolist(), proba, bundle,
                 ids=rows.loc[test, "id"].tolist(), split="test")


def reference_rows(pool: np.ndarray, p_ref: np.ndarray, batch: Batch, d: dict,
                   rng: np.random.Generator) -> np.ndarray:
    """The pool images the batch is compared with. The prevalence test uses the whole pool;
    the image/embedding tests a reference of at most max_images, resampled to the batch's
    predicted-positive rate when drift.match_prevalence (a change of prevalence alone is not
    a change of the images)."""
    threshold = float(batch.bundle["threshold"])
    if d["match_prevalence"]:
        ref = pool[prevalence_matched(p_ref >= threshold, float(np.mean(batch.proba >= threshold)),
                                      d["max_images"], rng)]
    else:
        ref = pool[subsample(len(pool), d["max_images"], rng)]
    if len(ref) < 5:
        raise PipelineError("drift: fewer than 5 pool images to compare with after matching the "
                            "batch's predicted-positive rate (set drift.match_prevalence: false)")
    return ref


def main(argv=None) -> None:
    args = parse(argv)
    params = load_params()
    d, positive = params["drift"], params["data"]["positive_class"]
    folder = d["batch"] if args.batch is None else args.batch
    rows, X, fingerprint = read_embeddings(EMBEDDINGS)
    clean = read_parquet(CLEAN, "clean manifest").drop_duplicates("id")
    rows = rows.merge(clean[["id", "path"]], on="id", how="left", validate="many_to_one")
    rng = np.random.default_rng(d["seed"])
    pool = np.flatnonzero(rows["split"].isin(["labeled", "unlabeled"]).to_numpy())
    size = int(fingerprint.get("image_size", params["embed"]["image_size"]))
    batch = folder_batch(folder, params, rng) if folder else \
        test_split_batch(rows, X, fingerprint, params, rng)
    p_ref = positive_proba(batch.bundle["model"], X[pool], positive)
    ref = reference_rows(pool, p_ref, batch, d, rng)
    ref_paths = rows.loc[ref, "path"].tolist()
    stats_ref, stats_new = image_stats(ref_paths, size), image_stats(batch.paths, size)
    res = compare(X[ref], batch.X, stats_ref, stats_new, p_ref, batch.proba,
                  float(batch.bundle["threshold"]), alpha=d["alpha"],
                  n_permutations=d["n_permutations"], pca_components=d["pca_components"],
                  seed=d["seed"])
    res["prevalence_matched"] = bool(d["match_prevalence"])
    ood = batch.bundle.get("ood")  # the served model's per-image OOD check, on the batch compared
    flags = ood_flags(ood, batch.X, params["cluster"]["backend"])  # the kNN search library
    if flags is not None:
        res["ood"] = {"count": int(flags.sum()), "n": int(len(flags)), "k": int(ood["k"]),
                      "quantile": float(ood["quantile"])}
        batch.extra.update(ood_count=res["ood"]["count"],
                           ood_share=round(res["ood"]["count"] / max(len(flags), 1), 6))
    order = np.argsort(-res["witness_batch"], kind="stable")[:N_TYPICAL]
    html = render_html(res, batch_name=batch.name, Z_ref=res["Z_ref"], Z_new=res["Z_new"],
                       stats_ref=stats_ref, stats_new=stats_new, p_ref=p_ref, p_new=batch.proba,
                       typical_paths=[batch.paths[i] for i in order], qc_failed=batch.n_failed,
                       n_files=batch.n_files, typical_ids=[batch.ids[i] for i in order] if batch.ids else (),
                       typical_split=batch.split, typical_scores=res["witness_batch"][order].tolist())
    with atomic_path(args.report) as tmp:
        tmp.write_text(html)
    write_metrics(flat_metrics(res, {**batch.extra,
                                     "reference_prevalence_matched": int(d["match_prevalence"])}),
                  batch.name, args.metrics)
    print_summary(res, batch.name, args.report)


def write_metrics(metrics: dict, name: str, path: str | None) -> None:
    if path:
        write_json(metrics, path)
        return
    with open_live("drift") as live:
        for key, value in metrics.items():
            live.log_metric(key, value, plot=False)
        live.log_param("batch", name)


def print_summary(res: dict, name: str, report: str) -> None:
    pr = res["positive_rate"]
    print(f"drift: {name}: {'DRIFT' if res['drift'] else 'no drift'} "
          f"(MMD p={res['mmd']['p_value']:.3f}, PCA KS min p={res['pca_ks_min_p_adjusted']:.3g}, "
          f"image stats min p={res['image_stats_min_p_adjusted']:.3g}); predicted-positive rate "
          f"{pr['batch']:.3f} vs {pr['reference']:.3f} (p={pr['p_value']:.3g}"
          f"{', shifted' if res['prediction_shift'] else ''}) → {report}")


if __name__ == "__main__":
    run_stage(main)
