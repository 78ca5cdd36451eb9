"""Stage `deid`: de-identify the DICOM files of the input layout into data/deid/ (PNG + index)
before any other stage reads the layout (docs/privacy.md). Demo mode: an empty index.

Logs counts only: no path, name, header value or pseudonym.
"""
from triage.ingest import DEID_DIR, deidentify_layout, index_stats, write_empty_index
from triage.io import open_live, run_stage
from triage.params import load_params


def main() -> None:
    params = load_params()
    data = params["data"]
    # archive mode lists its images in a manifest, which prepare never opens: no DICOM to
    # de-identify here (a DICOM in the archive is quarantined by qc's decode)
    if data["source"] in ("demo", "archive"):
        stats = index_stats(write_empty_index(DEID_DIR))
    else:
        _, stats = deidentify_layout(data["root"], params["deid"], DEID_DIR,
                                     links_outside_root=data["links_outside_root"])
    with open_live("deid") as live:
        for key, value in stats.items():
            live.log_metric(key, value, plot=False)
    reasons = ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in stats.items() if k.startswith("reason/"))
    print(f"deid: {stats['n_dicom']} DICOM files = {stats['n_deidentified']} de-identified + "
          f"{stats['n_rejected']} rejected{' (' + reasons + ')' if reasons else ''}; "
          f"{stats['n_patients']} patients (see {DEID_DIR}/index.parquet)")


if __name__ == "__main__":
    run_stage(main)
