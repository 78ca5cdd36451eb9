"""Stage `qc`: full decode + checks → data/qc/manifest_clean.parquet, data/qc/quarantine.csv,
reports/qc.html (data-quality dashboard) and metrics/qc/metrics.json.

Logs counts only: image paths belong in the CSV and the HTML, not in logs.
"""
import contextlib
import logging
from pathlib import Path

from triage.io import open_live, read_metadata, read_parquet, run_stage, write_csv, write_parquet
from triage.params import load_params
from triage.qc import run_qc
from triage.qc_cache import ID_SOURCE, ID_SOURCE_KEY, DecodeCache
from triage.qc_report import write_html

MANIFEST = Path("data/prepared/manifest.parquet")
CLEAN = Path("data/qc/manifest_clean.parquet")
QUARANTINE = Path("data/qc/quarantine.csv")
REPORT = Path("reports/qc.html")
# per-image decode results by content (`persist: true`): a re-run decodes new images only
DECODE_CACHE = Path("data/qc/image_cache.parquet")

log = logging.getLogger("triage.qc")


def main() -> None:
    params = load_params()
    q = params["qc"]
    manifest = read_parquet(MANIFEST, "manifest")
    log.info("qc: %d images to check", len(manifest))
    # embed.engine: where the full decode runs (ray: Ray tasks, qc.workers unused); the
    # same per-image function, so the same report
    if params["embed"]["engine"] == "ray":
        from triage import ray_tasks

        map_fn, engine = ray_tasks.map_ordered, ray_tasks.session()
    else:
        map_fn, engine = None, contextlib.nullcontext()
    meta = read_metadata(MANIFEST)
    # archive mode: the ids are the manifest's claims; each new content's bytes are checked
    cache = DecodeCache.load(DECODE_CACHE, max_pixels=q["max_pixels"],
                             convert_modes=q["convert_modes"],
                             verify=meta.get(ID_SOURCE_KEY) == ID_SOURCE,
                             workers=q["workers"])
    with engine:
        report = run_qc(manifest, **q, map_fn=map_fn, decode_cache=cache,
                        test_source=meta.get("test_source", "folder"))
    cache.save(DECODE_CACHE)
    write_parquet(report.clean, CLEAN)
    write_csv(report.quarantine, QUARANTINE)
    write_html(report, REPORT)
    with open_live("qc") as live:
        for key, value in report.stats.items():
            live.log_metric(key, value, plot=False)
    s = report.stats
    reasons = ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in s.items() if k.startswith("reason/"))
    print(f"qc: {s['n_images']} in = {s['n_passed']} passed + {s['n_quarantined']} quarantined"
          f"{' (' + reasons + ')' if reasons else ''}; {s['n_noted']} kept with a note; "
          f"{s['exact_duplicate_groups']} exact / {s['near_duplicate_groups']} near-duplicate groups; "
          f"{s['leaked_test_images']} leaked test images (see {QUARANTINE}, {REPORT})")
    # run to run (what the cache held): printed, never a metric, so the outputs stay a
    # function of the manifest
    print(f"qc: {cache.n_decoded} images decoded, {cache.n_cached} from the decode cache"
          + (f", {cache.n_failed_verify} failed the sha256/size check" if cache.verify else ""))


if __name__ == "__main__":
    run_stage(main)
