"""Stage `prepare`: scan the input folder layout into data/prepared/manifest.parquet."""
import contextlib
from pathlib import Path

from triage.archive import ID_SOURCE, ID_SOURCE_KEY, build_archive_manifest
from triage.io import open_live, run_stage, write_parquet
from triage.params import load_params
from triage.prepare import MANIFEST_SCHEMA, build_manifest, min_labeled_per_class

OUT = Path("data/prepared/manifest.parquet")
DEID_INDEX = Path("data/deid/index.parquet")  # the deid stage's: DICOM rows, de-identified
DEMO_ROOT = "data/demo/raw"


def main() -> None:
    params = load_params()
    data = params["data"]
    # the first stage that knows the labelled counts stops on a set too small for the chain
    minimum, why = min_labeled_per_class(params)
    root = DEMO_ROOT if data["source"] == "demo" else data["root"]
    # Active-learning labels: <data.root>/annotations.csv in both modes (data.root is a dep).
    annotations = Path(data["root"]) / "annotations.csv"
    # embed.engine: where the per-file work (read, sha256, header) runs; the same manifest
    if params["embed"]["engine"] == "ray":
        from triage import ray_tasks

        map_fn, engine = ray_tasks.map_ordered, ray_tasks.session()
    else:
        map_fn, engine = None, contextlib.nullcontext()
    archive = data["source"] == "archive"
    if archive:  # the archive manifest is the input: no image is read here (triage.archive)
        manifest, info = build_archive_manifest(root, data["positive_class"],
                                                data["test_fraction"], data["seed"],
                                                annotations=annotations, min_per_class=minimum,
                                                min_per_class_why=why)
    else:
        with engine:  # one Ray for the stage's calls (labelled, pool, test, DICOM index)
            manifest, info = build_manifest(root, data["positive_class"], data["test_fraction"],
                                            data["seed"], annotations=annotations,
                                            links_outside_root=data["links_outside_root"],
                                            min_per_class=minimum, min_per_class_why=why,
                                            deid_index=DEID_INDEX,
                                            patients=Path(root) / "patients.csv", map_fn=map_fn)
    # qc reads it: a test split the pipeline drew may be rearranged, a given test/ may not
    # (archive: its ids are the manifest's claims, which qc checks against the bytes)
    write_parquet(manifest, OUT, schema=MANIFEST_SCHEMA,
                  metadata={"test_source": info["test_source"],
                            **({ID_SOURCE_KEY: ID_SOURCE} if archive else {})})
    with open_live("prepare") as live:
        live.log_metric("n_files", len(manifest), plot=False)
        for split in ("labeled", "unlabeled", "test"):
            live.log_metric(f"n/{split}", int((manifest["split"] == split).sum()), plot=False)
        for cls in info["classes"]:
            live.log_metric(f"n_labeled/{cls}", int(((manifest["split"] == "labeled")
                                                     & (manifest["label"] == cls)).sum()), plot=False)
        live.log_metric("n_unreadable", int(manifest["read_error"].notna().sum()), plot=False)
        live.log_metric("n_hidden_ignored", info["n_hidden_ignored"], plot=False)
        live.log_metric("n_annotated", info["n_annotated"], plot=False)
        for key in ("n_dicom", "n_patients", "n_annotated_test_patient"):
            live.log_metric(key, info[key], plot=False)
        live.log_param("test_source", info["test_source"])
        live.log_param("min_labeled_per_class", minimum)


if __name__ == "__main__":
    run_stage(main)
