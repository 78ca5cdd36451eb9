"""Stage `embed`: embed.backbone (ResNet18 by default) without its classifier →
data/features/embeddings.parquet (float32 vectors of the backbone's feature dimension)."""
import contextlib
import time
from pathlib import Path

from triage.backbone import check_weights_dependency
from triage.embed import Embedder
from triage.io import open_live, read_parquet, run_stage, write_json
from triage.params import load_params
from triage.progress import progress_batches
from triage.store import load_reusable, remove_store, write_embeddings, write_partitioned

CLEAN = Path("data/qc/manifest_clean.parquet")
OUT = Path("data/features/embeddings.parquet")
RUNTIME = Path("metrics/runtime/embed.json")
WEIGHTS_DIR = Path("data/weights")


def main() -> None:
    e = load_params()["embed"]
    rows = read_parquet(CLEAN, "clean manifest")
    # Only files under data/weights/ are a declared dependency of this stage: a file
    # elsewhere could change without DVC re-running the embedding.
    check_weights_dependency(e["weights"], "embed.weights")
    embedder = Embedder(e["weights"], backbone=e["backbone"], seed=e["seed"],
                        weights_sha256=e["weights_sha256"] or None,
                        image_size=e["image_size"], crop=e["crop"], batch_size=e["batch_size"],
                        num_workers=e["num_workers"], device=e["device"],
                        precision=e["precision"], kernels=e["kernels"],
                        layers=e["layers"]).fit()
    # OUT is `persist: true` in dvc.yaml: DVC leaves the previous store in place so
    # vectors of unchanged images (same id, same fingerprint) are reused, not recomputed.
    # embed.store: partitioned reads only the parts it rewrites (write_partitioned); a store
    # of the other layout is read whole once, then replaced.
    partitioned = e["store"] == "partitioned"
    if partitioned != OUT.is_dir():
        reuse = load_reusable(OUT, embedder.fingerprint_["fingerprint"])
        remove_store(OUT)
    else:
        reuse = None if partitioned else load_reusable(OUT, embedder.fingerprint_["fingerprint"])

    # embed.engine: where the per-image work runs; the vectors (and the file) are the same
    if e["engine"] == "ray":
        from triage import ray_engine

        batches, engine = ray_engine.compute_fn(embedder), ray_engine.session()
    else:
        batches, engine = embedder.iter_batches, contextlib.nullcontext()

    def compute(paths):  # the embedder's batches, counted in images on stderr
        return progress_batches(batches(paths), total=len(paths), desc="embed", unit="img")

    start = time.perf_counter()
    write = write_partitioned if partitioned else write_embeddings
    with engine:
        n_new, n_reused = write(rows, OUT, fingerprint=embedder.fingerprint_,
                                compute=compute, reuse=reuse)
    seconds = time.perf_counter() - start
    n = n_new + n_reused
    fingerprint = embedder.fingerprint_
    with open_live("embed") as live:
        live.log_metric("n_images", n, plot=False)
        for key in ("weights", "weights_sha256", "image_size", "precision", "kernels",
                    "layers", "fingerprint"):
            live.log_param(key, fingerprint.get(key))
        live.log_param("device", embedder.device_)
    # Timings vary run to run: kept out of the stage's outputs so `dvc repro -f` gives an
    # identical dvc.lock; still a top-level metric, so `dvc metrics diff` shows them.
    write_json({"embed": {"n_images": n, "n_embedded_new": n_new, "n_reused": n_reused,
                          "seconds": round(seconds, 2),
                          "throughput_img_s": round(n_new / max(seconds, 1e-9), 1),
                          "device": embedder.device_, "precision": fingerprint["precision"]}},
               RUNTIME)
    print(f"embed: {n} images ({n_new} computed, {n_reused} reused), "
          f"{n_new / max(seconds, 1e-9):.1f} img/s on {embedder.device_} "
          f"({fingerprint['backbone']} {embedder.feature_dim_}-d, {fingerprint['weights']}, "
          f"{fingerprint['precision']})")


if __name__ == "__main__":
    run_stage(main)
