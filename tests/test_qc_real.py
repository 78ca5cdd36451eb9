"""QC on the real shared datasets (../shared/datasets; skipped when absent).

The input layout is built in tmp_path from symlinks to the shared files (never copies),
then the real prepare + QC functions run on it. The counts asserted here are the ones
reported in docs/qc.md; DUPLICATES.txt / PROVENANCE.md of each dataset are the
independent reference.
"""
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import QC as HELPER_QC

from triage.prepare import build_manifest
from triage.qc import run_qc

QC = {**HELPER_QC, "workers": 0}  # all cores: real datasets
IMAGE_EXT = {".jpg", ".jpeg", ".png"}


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)


def build_yes_no_layout(ds: Path, root: Path) -> Path:
    """yes → labeled/cancer, no → labeled/normal (prepare makes the seeded test split)."""
    for src_cls, cls in (("yes", "cancer"), ("no", "normal")):
        for p in images(ds / src_cls):
            link(p, root / "labeled" / cls / p.name)
    return root


def build_4class_layout(ds: Path, root: Path, seed: int = 0) -> Path:
    """Training → 100 labelled (50 tumour / 50 notumor, seeded) + the rest unlabelled;
    Testing → test/cancer (glioma, meningioma, pituitary) and test/normal (notumor)."""
    rng = np.random.default_rng(seed)
    tumour = [p for c in ("glioma", "meningioma", "pituitary") for p in images(ds / "Training" / c)]
    normal = images(ds / "Training" / "notumor")
    pick_t = set(rng.choice(len(tumour), 50, replace=False).tolist())
    pick_n = set(rng.choice(len(normal), 50, replace=False).tolist())
    for k, p in enumerate(tumour):
        link(p, root / ("labeled/cancer" if k in pick_t else "unlabeled") / p.name)
    for k, p in enumerate(normal):
        link(p, root / ("labeled/normal" if k in pick_n else "unlabeled") / p.name)
    for c in ("glioma", "meningioma", "pituitary", "notumor"):
        for p in images(ds / "Testing" / c):
            link(p, root / "test" / ("normal" if c == "notumor" else "cancer") / p.name)
    return root


def duplicate_groups(dataset: Path) -> list[list[str]]:
    lines = (dataset / "DUPLICATES.txt").read_text().splitlines()
    return [line.split("\t")[1:] for line in lines if line and not line.startswith("#")]


def check_invariant(manifest, report):
    assert len(manifest) == len(report.clean) + len(report.quarantine)
    assert report.stats["n_images"] == report.stats["n_passed"] + report.stats["n_quarantined"]
    assert set(report.clean["path"]) | set(report.quarantine["path"]) == set(manifest["path"])


@pytest.fixture(scope="module")
def in_tmp(tmp_path_factory):
    """Run with cwd = a temp folder so manifest paths are short relative symlink paths."""
    tmp = tmp_path_factory.mktemp("real")
    cwd = os.getcwd()
    os.chdir(tmp)
    yield tmp
    os.chdir(cwd)


# --------------------------------------------------------------------------- brain_mri_yes_no


@pytest.fixture(scope="module")
def yes_no(in_tmp):
    from conftest import SHARED_DATASETS
    ds = SHARED_DATASETS / "brain_mri_yes_no"
    if not ds.is_dir():
        pytest.skip(f"shared dataset absent: {ds}")
    root = build_yes_no_layout(ds, Path("yn/raw"))
    manifest, info = build_manifest(root, "cancer", 0.25, 0)  # seeded stratified test split
    report = run_qc(manifest, **QC, test_source=info["test_source"])  # as the qc stage does
    check_invariant(manifest, report)
    return ds, manifest, report


def test_yes_no_all_253_images_decode_and_the_25_duplicates_are_found(yes_no):
    ds, manifest, r = yes_no
    s = r.stats
    assert s["n_images"] == 253
    groups = duplicate_groups(ds)
    assert len(groups) == 22 and sum(len(g) - 1 for g in groups) == 25  # the reference
    assert s["exact_duplicate_groups"] == 22
    # 25 extra copies, all within one class: quarantined as duplicate, or as leakage when
    # the stratified split put one copy in test and another in labeled.
    assert s.get("reason/duplicate", 0) + s.get("reason/leakage", 0) == 25
    assert s.get("reason/label_conflict", 0) == 0
    assert s["n_quarantined"] == 25 and s["n_passed"] == 228
    # near-copies the seeded split put in test are moved back to labelled, not dropped
    assert s["near_moved_to_labeled"] == s["near_leaked_test_images"]
    assert s["near_leaked_test_dropped"] == 0
    # the quarantined copies are exactly the non-first members of the reference groups
    q = {Path(p).name for p in r.quarantine["path"]}
    ref = {Path(p).name for g in groups for p in g}
    assert q <= ref


def test_yes_no_png_named_jpg_rgba_and_mixed_sizes_are_reported(yes_no):
    _, manifest, r = yes_no
    s = r.stats
    f = r.frame
    png_as_jpg = f["qc_note"].fillna("").str.contains("format PNG named .jpg").sum()
    header_png_jpg = ((manifest["format"] == "PNG")
                      & manifest["path"].str.lower().str.endswith((".jpg", ".jpeg"))).sum()
    assert png_as_jpg == header_png_jpg == s["notes/format_mismatch"] + \
        f.loc[f["reason"].notna(), "qc_note"].fillna("").str.contains("format PNG").sum()
    assert png_as_jpg == 6  # 8 PNG files, 6 of them named .jpg (Pillow's format sniffing)
    assert s["input_modes/RGBA"] == 5  # PROVENANCE.md: 248 RGB + 5 RGBA
    assert s["input_modes/RGB"] + s["input_modes/RGBA"] + s.get("input_modes/L", 0) \
        + s.get("input_modes/P", 0) == 253
    rgba_kept = f[(f["decoded_mode"] == "RGBA") & f["reason"].isna()]
    assert rgba_kept["qc_note"].str.contains("mode RGBA converted to L").all()
    # PROVENANCE.md says 185 distinct sizes (read with gdk-pixbuf); Pillow's headers give 184
    assert s["size/distinct"] == 184
    assert s["size/min_side"] == 150 and s["size/max_side"] == 1920
    assert s["size/outliers"] >= 1 and s["notes/size_outlier"] >= 1


# --------------------------------------------------------------------------- brain_mri_4class


@pytest.fixture(scope="module")
def four_class(in_tmp):
    """The Training/Testing folders as folder input (see build_4class_layout)."""
    from conftest import SHARED_DATASETS
    ds = SHARED_DATASETS / "brain_mri_4class"
    if not ds.is_dir():
        pytest.skip(f"shared dataset absent: {ds}")
    root = build_4class_layout(ds, Path("fc/raw"))
    manifest, _ = build_manifest(root, "cancer", 0.25, 0)
    assert len(manifest) == 7019
    return ds, manifest


def _cross_split_reference(ds):
    groups = duplicate_groups(ds)
    cross = [g for g in groups if {p.split("/")[0] for p in g} == {"Training", "Testing"}]
    test_copies = sum(p.startswith("Testing/") for g in cross for p in g)
    within = [g for g in groups if g not in cross]
    return groups, cross, test_copies, within


def test_4class_cross_split_copies_are_leakage_and_dropped(four_class):
    ds, manifest = four_class
    r = run_qc(manifest, **QC)
    check_invariant(manifest, r)
    s = r.stats
    groups, cross, test_copies, _ = _cross_split_reference(ds)
    assert len(groups) == 300 and len(cross) == 189  # the reference (PROVENANCE.md)
    assert s["leaked_test_groups"] == 189
    assert s["leaked_test_images"] == s["leaked_test_dropped"] == test_copies
    assert s["reason/leakage"] == test_copies
    assert s["exact_duplicate_groups"] == 300
    assert s["n_images"] - len(manifest["id"].unique()) == s["n_quarantined"] - s.get(
        "reason/near_duplicate", 0) - s.get("reason/near_leakage", 0)  # every byte-copy
    # beyond the first is quarantined
    leaked = r.quarantine[r.quarantine["reason"] == "leakage"]
    assert leaked["path"].str.startswith("fc/raw/test/").all()
    assert leaked["detail"].str.contains("fc/raw/(?:labeled|unlabeled)/", regex=True).all()
    # near duplicates (re-encoded / re-windowed copies) are reported, not dropped (default),
    # except test near-copies of training images: leakage, dropped like exact copies
    assert s["near_duplicate_groups"] > 0 and s["near_leaked_test_images"] > 0
    assert s["reason/near_leakage"] == s["near_leaked_test_dropped"] == s["near_leaked_test_images"]
    near = r.quarantine[r.quarantine["reason"] == "near_leakage"]
    assert near["path"].str.startswith("fc/raw/test/").all()


def test_4class_leakage_policy_keep_reports_but_keeps(four_class):
    ds, manifest = four_class
    r = run_qc(manifest, **{**QC, "leakage_policy": "keep"})
    check_invariant(manifest, r)
    s = r.stats
    _, cross, test_copies, _ = _cross_split_reference(ds)
    assert s["leaked_test_groups"] == 189 and s["leaked_test_images"] == test_copies
    assert s["leaked_test_dropped"] == 0 and "reason/leakage" not in s
    assert s["notes/leakage_kept"] == test_copies

