"""Stage `qc`: full decode + checks → data/qc/manifest_clean.parquet, data/qc/quarantine.csv,
reports/qc.html (data-quality dashboard) and metrics/qc/metrics.json.

Logs counts only: image paths belong in the CSV and the HTML, not in logs.
"""
import logging
from pathlib import Path

from triage.io import open_live, read_metadata, read_parquet, run_stage, write_csv, write_parquet
from triage.params import load_params
from triage.qc import run_qc
from triage.qc_report import write_html

MANIFEST = Path("data/prepared/manifest.parquet")
CLEAN = Path("data/qc/manifest_clean.parquet")
QUARANTINE = Path("data/qc/quarantine.csv")
REPORT = Path("reports/qc.html")

log = logging.getLogger("triage.qc")


def main() -> None:
    q = load_params()["qc"]
    manifest = read_parquet(MANIFEST, "manifest")
    log.info("qc: %d images to check", len(manifest))
    report = run_qc(manifest, **q, test_source=read_metadata(MANIFEST).get("test_source", "folder"))
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


if __name__ == "__main__":
    run_stage(main)
