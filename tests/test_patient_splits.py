"""Patient-level splits: patients.csv, the group-aware test split, QC's patient_leakage,
CV folds and active-learning imports keep one patient's images on one side (real PNGs)."""
import imagefactory as F
import numpy as np
import pandas as pd
import pytest
from helpers import QC

from triage.errors import DataError
from triage.prepare import build_manifest, stratified_test_split
from triage.qc import run_qc
from triage.splits import kfold


def _old_split(labels: pd.Series, test_fraction: float, seed: int) -> np.ndarray:
    # the split as it was before patients existed (the demo's outputs depend on it)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls in sorted(labels.unique()):
        idx = np.flatnonzero(labels.to_numpy() == cls)
        mask[rng.choice(idx, size=int(round(len(idx) * test_fraction)), replace=False)] = True
    return mask


def _patients_csv(root, rows) -> None:
    (root / "patients.csv").write_text("path,patient\n" + "".join(f"{p},{q}\n" for p, q in rows))


def _layout_with_patients(tmp_path, per_patient=3, n_patients=6, n_unlabeled=4, test=None):
    """labeled/<class>/ with ``n_patients`` patients per class, ``per_patient`` images each."""
    n = per_patient * n_patients
    lay = F.make_layout(tmp_path / "raw", n_labeled={"cancer": n, "normal": n},
                        n_unlabeled=n_unlabeled, n_test=test)
    rows = []
    for cls in ("cancer", "normal"):
        for i, p in enumerate(lay["labeled"][cls]):
            rows.append((p.relative_to(lay["root"]).as_posix(), f"{cls[0]}{i // per_patient}"))
    return lay, rows


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_without_patients_the_split_is_the_one_it_always_was(seed):
    labels = pd.Series(["cancer"] * 13 + ["normal"] * 11)
    old = _old_split(labels, 0.25, seed)
    assert (stratified_test_split(labels, 0.25, seed) == old).all()
    assert (stratified_test_split(labels, 0.25, seed, groups=pd.Series([None] * 24)) == old).all()


def test_patient_level_split_keeps_each_patient_on_one_side_seeded():
    rng = np.random.default_rng(3)
    labels = pd.Series(rng.choice(["cancer", "normal"], 120))
    groups = pd.Series([f"p{i}" for i in rng.integers(0, 30, 120)])
    groups[::7] = None  # unknown patients: images of their own
    mask = stratified_test_split(labels, 0.25, 0, groups=groups)
    known = groups.notna()
    sides = pd.DataFrame({"g": groups[known], "test": mask[known.to_numpy()]}).groupby("g")["test"].nunique()
    assert (sides == 1).all()
    for cls in ("cancer", "normal"):  # near the target fraction
        n = (labels == cls).sum()
        assert abs((mask & (labels == cls).to_numpy()).sum() - 0.25 * n) <= 0.1 * n
    assert (stratified_test_split(labels, 0.25, 0, groups=groups) == mask).all()
    assert not (stratified_test_split(labels, 0.25, 1, groups=groups) == mask).all()


def test_patients_csv_groups_the_split_and_a_pool_patient_never_goes_to_test(tmp_path):
    lay, rows = _layout_with_patients(tmp_path)
    pool = lay["unlabeled"][0].relative_to(lay["root"]).as_posix()
    rows.append((pool, "c0"))  # patient c0 also has a pool image
    _patients_csv(lay["root"], rows)
    for seed in range(6):
        df, info = build_manifest(lay["root"], "cancer", 0.34, seed,
                                  patients=lay["root"] / "patients.csv")
        assert info["n_patients"] == 12
        lab = df[df["split"] != "unlabeled"]
        assert (lab.groupby("patient")["split"].nunique() == 1).all()
        assert set(df.loc[df["patient"] == "c0", "split"]) <= {"labeled", "unlabeled"}
        assert set(lab["split"]) == {"labeled", "test"}
        assert df.loc[df["split"] == "unlabeled", "patient"].notna().sum() == 1


def test_patients_csv_paths_as_listed_or_relative_to_the_root(tmp_path):
    lay, rows = _layout_with_patients(tmp_path, n_patients=2)
    full = [(str(lay["root"] / p), q) for p, q in rows[:3]] + rows[3:]
    _patients_csv(lay["root"], full)
    df, _ = build_manifest(lay["root"], "cancer", 0.34, 0, patients=lay["root"] / "patients.csv")
    assert df.loc[df["split"] != "unlabeled", "patient"].notna().all()
    assert df.loc[df["split"] == "unlabeled", "patient"].isna().all()
    missing, _ = build_manifest(lay["root"], "cancer", 0.34, 0, patients=lay["root"] / "no.csv")
    assert missing["patient"].isna().all()


@pytest.mark.parametrize("text,match", [
    ("path,patient\nlabeled/cancer/nope.png,p1\n",
     r"patients.csv line 2: unknown image path 'labeled/cancer/nope.png'"),
    ("path,patient\nlabeled/cancer/cancer_000.png,\n", r"line 2: empty path or patient"),
    ("path,patient\nlabeled/cancer/cancer_000.png,p1\nlabeled/cancer/cancer_000.png,p2\n",
     r"line 3: image 'labeled/cancer/cancer_000.png' given patient 'p2' but line 2 gives it 'p1'"),
    ("path,subject\nlabeled/cancer/cancer_000.png,p1\n", r"columns must be `path` and `patient`"),
    ("path,patient\nlabeled/cancer/cancer_000.png,p1,extra\n", r"line 2: 3 fields, the header has 2"),
    ("", r"empty file"),
])
def test_patients_csv_errors_name_the_line(tmp_path, text, match):
    lay = F.make_layout(tmp_path / "raw")
    (lay["root"] / "patients.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        build_manifest(lay["root"], "cancer", 0.25, 0, patients=lay["root"] / "patients.csv")


def test_patients_csv_refuses_a_dicom_file_without_echoing_its_name(tmp_path):
    lay = F.make_layout(tmp_path / "raw")
    (lay["root"] / "unlabeled" / "DOE^JANE.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    index = tmp_path / "index.parquet"  # what the deid stage wrote for it (rejected)
    pd.DataFrame([{"path": "data/deid/unlabeled/ab12.dcm", "split": "unlabeled", "label": None,
                   "patient": "ffee", "reason": "dicom_unreadable", "detail": None,
                   "notes": None}]).to_parquet(index)
    df, _ = build_manifest(lay["root"], "cancer", 0.25, 0, deid_index=index)
    assert len(df) == 13
    for listed in ("unlabeled/DOE^JANE.dcm", "data/deid/unlabeled/ab12.dcm"):
        (lay["root"] / "patients.csv").write_text(f"path,patient\n{listed},p1\n")
        with pytest.raises(DataError, match="line 2: names a DICOM file") as exc:
            build_manifest(lay["root"], "cancer", 0.25, 0, deid_index=index,
                           patients=lay["root"] / "patients.csv")
        assert "DOE" not in str(exc.value)


def _qc(manifest, **kw):
    report = run_qc(manifest, **{**QC, **kw})
    assert len(manifest) == len(report.clean) + len(report.quarantine)
    return report


def _leaky_layout(tmp_path):
    """A given test/ folder; patient c0 has labelled and test images, n9 test and pool."""
    lay, rows = _layout_with_patients(tmp_path, per_patient=2, n_patients=4,
                                      test={"cancer": 3, "normal": 3})
    rel = lambda p: p.relative_to(lay["root"]).as_posix()  # noqa: E731
    rows += [(rel(lay["test"]["cancer"][0]), "c0"), (rel(lay["test"]["cancer"][1]), "c0"),
             (rel(lay["test"]["normal"][0]), "n9"), (rel(lay["unlabeled"][0]), "n9"),
             (rel(lay["test"]["normal"][1]), "t1")]
    _patients_csv(lay["root"], rows)
    df, info = build_manifest(lay["root"], "cancer", 0.25, 0, patients=lay["root"] / "patients.csv")
    return lay, df, info


def test_patient_in_training_and_a_given_test_folder_is_leakage_per_policy(tmp_path):
    lay, manifest, info = _leaky_layout(tmp_path)
    assert info["test_source"] == "folder"
    leaked = {lay["test"]["cancer"][0].as_posix(), lay["test"]["cancer"][1].as_posix(),
              lay["test"]["normal"][0].as_posix()}
    r = _qc(manifest, leakage_policy="drop_test")
    q = r.quarantine.set_index("path")
    assert set(q.index[q["reason"] == "patient_leakage"]) == leaked
    assert r.stats["patient_leaked_test_images"] == r.stats["patient_leaked_test_dropped"] == 3
    assert r.stats["patient_leaked_patients"] == 2
    test_patients = set(r.clean.loc[r.clean["split"] == "test", "patient"].dropna())
    assert test_patients.isdisjoint(r.clean.loc[r.clean["split"] != "test", "patient"])
    assert "t1" in test_patients  # a patient only in test stays
    kept = _qc(manifest, leakage_policy="keep")
    assert "patient_leakage" not in set(kept.quarantine["reason"])
    assert kept.stats["notes/patient_leakage_kept"] == 3
    assert kept.stats["patient_leaked_test_dropped"] == 0
    with pytest.raises(DataError, match=r"3 test images of 2 patients .*qc.leakage_policy=fail"):
        _qc(manifest, leakage_policy="fail")


def test_a_drawn_split_moves_a_leaked_patient_to_labeled(tmp_path):
    lay, rows = _layout_with_patients(tmp_path, n_patients=4)
    _patients_csv(lay["root"], rows)
    df, info = build_manifest(lay["root"], "cancer", 0.25, 0, patients=lay["root"] / "patients.csv")
    assert info["test_source"] == "split"
    # a patient on both sides by hand (the split itself never does it)
    test_patient = df.loc[df["split"] == "test", "patient"].iloc[0]
    i = df.index[(df["patient"] == test_patient)][0]
    df.loc[i, "split"] = "labeled"
    r = _qc(df, test_source="split")
    assert r.stats["patient_moved_to_labeled"] >= 1 and r.stats["patient_leaked_test_dropped"] == 0
    assert set(r.clean.loc[r.clean["patient"] == test_patient, "split"]) == {"labeled"}


def test_cv_folds_keep_a_patient_on_one_side_end_to_end(tmp_path):
    # prepare -> qc (split group = patient) -> the folds every CV of the chain uses
    lay, rows = _layout_with_patients(tmp_path, per_patient=3, n_patients=6)
    _patients_csv(lay["root"], rows)
    manifest, _ = build_manifest(lay["root"], "cancer", 0.25, 0, patients=lay["root"] / "patients.csv")
    clean = _qc(manifest).clean
    lab = clean[clean["split"] == "labeled"].reset_index(drop=True)
    assert (lab.groupby("patient")["group"].nunique() == 1).all()
    assert lab["group"].nunique() == lab["patient"].nunique()
    folds, k = kfold(lab["label"].to_numpy(), 3, 0, groups=lab["group"].to_numpy())
    assert k == 3
    for train, held in folds:
        assert set(lab.loc[train, "patient"]).isdisjoint(lab.loc[held, "patient"])


def test_annotating_a_pool_image_of_a_test_patient_is_counted_then_handled_by_qc(tmp_path):
    lay, manifest, _ = _leaky_layout(tmp_path)
    pool = lay["unlabeled"][0]  # patient n9, who has a test image
    ann = lay["root"] / "annotations.csv"
    ann.write_text(f"path,label\n{pool.relative_to(lay['root']).as_posix()},normal\n")
    df, info = build_manifest(lay["root"], "cancer", 0.25, 0, annotations=ann,
                              patients=lay["root"] / "patients.csv")
    assert info["n_annotated"] == 1 and info["n_annotated_test_patient"] == 1
    row = df.set_index("path").loc[pool.as_posix()]
    assert row["split"] == "labeled" and row["label"] == "normal" and row["patient"] == "n9"
    r = _qc(df)
    q = r.quarantine.set_index("path")
    assert q.loc[lay["test"]["normal"][0].as_posix(), "reason"] == "patient_leakage"
