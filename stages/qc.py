"""Stage `qc`: full decode + checks → data/qc/manifest_clean.parquet and data/qc/quarantine.csv."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.io import open_live, read_parquet, run_stage, write_csv, write_parquet  # noqa: E402
from triage.params import load_params  # noqa: E402
from triage.qc import run_qc  # noqa: E402

MANIFEST = Path("data/prepared/manifest.parquet")
CLEAN = Path("data/qc/manifest_clean.parquet")
QUARANTINE = Path("data/qc/quarantine.csv")


def main() -> None:
    q = load_params()["qc"]
    manifest = read_parquet(MANIFEST, "manifest")
    report = run_qc(manifest, min_side=q["min_side"], max_pixels=q["max_pixels"],
                    min_std=q["min_std"], max_aspect=q["max_aspect"],
                    leakage_policy=q["leakage_policy"], workers=q["workers"])
    write_parquet(report.clean, CLEAN)
    write_csv(report.quarantine, QUARANTINE)
    with open_live("qc") as live:
        for key, value in report.stats.items():
            live.log_metric(key, value, plot=False)
    print(f"qc: {report.stats['n_passed']} passed, {report.stats['n_quarantined']} quarantined "
          f"(see {QUARANTINE})")


if __name__ == "__main__":
    run_stage(main)
