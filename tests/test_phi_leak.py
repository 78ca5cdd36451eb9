"""The PHI-leak test: a folder layout made only of DICOM files with planted identifiers, the
real `dvc repro` in a temp repo, then every byte of every output is searched for them.

Planted: PatientName, PatientID, PatientBirthDate, AccessionNumber, InstitutionName,
ReferringPhysicianName, OperatorsName, Study/Series/SOP Instance UIDs (and the bundled
files' own UIDs), a private tag, two nested sequences (OtherPatientIDsSequence;
RequestAttributesSequence > ReferencedStudySequence), the file names and the folder names.
Searched (case-insensitive, also with ``^`` as a space): data/ except data/raw, reports/,
metrics/, dvc.lock, the repo's .dvc/ (cache included) and the captured stdout/stderr of the
runs. DVC's own state database (DVC_SITE_CACHE_DIR, here in the temp folder) records raw
input paths as any filesystem index does: it is not an output (docs/privacy.md).
"""
import json
from pathlib import Path

import dicomfactory as D
import numpy as np
import pandas as pd
from helpers import e2e_env, make_repo, run, set_params

from triage.deid import KEY_ENV, KEY_FILE_ENV

KEY = "phi-leak-test-secret-" + "9f8e7d6c5b4a3210" * 2
STAGES_AFTER_DEID = ("prepare", "qc", "embed", "cluster", "pseudo_label", "train", "evaluate")


def _name(p: int, k: int, ext: str = ".dcm") -> str:
    """A file name carrying the patient's name, MRN and accession number, as exports often do."""
    v = D.patient_values(p)
    return f"{v['PatientName']}_{v['PatientID']}_ACC{987000 + 100 * p + k}{ext}"


def build_layout(raw: Path, planted: D.Planted) -> dict:
    """56 DICOM files, several per patient, 2 classes, a test/ folder. Returns what QC must do."""
    exts = (".dcm", "", ".DCM", ".ima")
    files = []

    def add(path, p, k, cancer, **kw):
        files.append(D.wrap(D.image(1000 * p + k, cancer), path, p, k, planted, **kw))

    for cls, first in (("cancer", 0), ("normal", 10)):  # 6 patients x 2 images per class
        for p in range(first, first + 6):
            for k in range(2):
                add(raw / "labeled" / cls / _name(p, k, exts[(p + k) % 4]), p, k, cls == "cancer")
    add(raw / "labeled/cancer" / _name(6, 0), 6, 0, True, burned_in="YES")  # burned-in text
    files.append(D.bundled("JPEGLSNearLossless_08.dcm", raw / "labeled/normal" / _name(16, 0), 16, 0,
                           planted))  # compressed: no decoder installed
    for cls, first in (("cancer", 20), ("normal", 30)):  # test/: 2 patients x 2 per class
        for p in range(first, first + 2):
            for k in range(2):
                add(raw / "test" / cls / _name(p, k), p, k, cls == "cancer")
    add(raw / "test/cancer" / _name(0, 2), 0, 2, True)   # patient 0 is also in labeled/: leakage
    add(raw / "test/normal" / _name(32, 0), 32, 0, False, burned_in="YES")
    for p in range(40, 48):  # the pool: a folder per patient named after them
        folder = f"{D.patient_values(p)['PatientName']}_{D.patient_values(p)['PatientID']}"
        planted.values.add(folder)
        for k in range(2):
            add(raw / "unlabeled" / folder / f"IMG_ACC{987000 + 100 * p + k}.dcm", p, k, p % 2 == 0)
    files.append(D.bundled("CT_small.dcm", raw / "unlabeled" / _name(48, 0), 48, 0, planted))
    files.append(D.bundled("MR_small.dcm", raw / "unlabeled" / _name(49, 0, ""), 49, 0, planted))
    add(raw / "unlabeled" / _name(50, 0), 50, 0, False, modality="US", sop_class=D.US)
    frames = [D.image(5100 + i, False) for i in range(3)]
    files.append(D.wrap(np.stack(frames), raw / "unlabeled" / _name(51, 0), 51, 0,
                        planted))
    for f in files:
        planted.values.add(f.name)
    return {"n": len(files), "burned_in": 3, "dicom_compressed": 1, "patient_leakage": 1}


def searched_files(repo: Path) -> list[Path]:
    out = [repo / "dvc.lock"]
    for top in ("data", "reports", "metrics", ".dvc"):
        for path in sorted((repo / top).rglob("*")):
            if path.is_file() and not path.relative_to(repo).as_posix().startswith("data/raw/"):
                out.append(path)
    return out


def find_leaks(blobs: dict[str, bytes], needles: list[str]) -> list[tuple[str, str]]:
    lowered = {name: data.lower() for name, data in blobs.items()}
    hits = []
    for needle in {n.lower() for n in needles}:
        encoded = needle.encode("utf-8")
        hits += [(name, needle) for name, data in lowered.items() if encoded in data]
    return sorted(hits)


def test_no_planted_identifier_reaches_any_output(tmp_path):
    env = e2e_env(tmp_path)
    for var in (KEY_ENV, KEY_FILE_ENV):
        env.pop(var, None)
    repo = make_repo(tmp_path, env)
    set_params(repo, {"data.source": "folder", "cluster.k": 3})
    planted = D.Planted()
    expect = build_layout(repo / "data/raw", planted)
    assert 40 <= expect["n"] <= 60

    # without the key: the deid stage stops at once with load_key's message, nothing after it runs
    nokey = run(["dvc", "repro"], repo, env, check=False)
    said = nokey.stdout + nokey.stderr
    assert nokey.returncode != 0
    assert "Running stage 'deid'" in said and KEY_ENV in said, said[-3000:]
    assert not [s for s in STAGES_AFTER_DEID if f"Running stage '{s}'" in said], said[-3000:]

    keyed = run(["dvc", "repro"], repo, {**env, KEY_ENV: KEY})
    assert "Running stage 'evaluate'" in keyed.stdout

    # what QC did with the DICOM files
    qc = json.loads((repo / "metrics/qc/metrics.json").read_text())
    assert qc["n_images"] == expect["n"] == qc["n_passed"] + qc["n_quarantined"]
    quarantine = pd.read_csv(repo / "data/qc/quarantine.csv")
    reasons = quarantine["reason"].value_counts().to_dict()
    for why in ("burned_in", "dicom_compressed", "patient_leakage"):
        assert reasons.get(why) == expect[why], reasons
    assert quarantine["path"].str.match(r"^data/deid/(labeled|unlabeled|test)/").all()
    assert qc["patient_leaked_test_images"] == qc["patient_leaked_test_dropped"] == 1
    deid = json.loads((repo / "metrics/deid/metrics.json").read_text())
    assert deid["n_dicom"] == expect["n"] and deid["n_patients"] == 31

    # patient-level splits: no patient on both sides; every patient is one split group
    clean = pd.read_parquet(repo / "data/qc/manifest_clean.parquet")
    assert clean["patient"].notna().all()
    test_patients = set(clean.loc[clean["split"] == "test", "patient"])
    assert test_patients and test_patients.isdisjoint(clean.loc[clean["split"] != "test", "patient"])
    assert (clean.groupby("patient")["group"].nunique() == 1).all()
    assert clean["path"].str.match(r"^data/deid/[a-z/]+/[0-9a-f]{16}\.png$").all()
    assert json.loads((repo / "metrics/evaluate/metrics.json").read_text())["n_test"] == 8

    # every byte of every output, and of what the runs printed
    files = searched_files(repo)
    blobs = {p.relative_to(repo).as_posix(): p.read_bytes() for p in files}
    blobs["<stdout/stderr without the key>"] = said.encode()
    blobs["<stdout/stderr with the key>"] = (keyed.stdout + keyed.stderr).encode()
    assert any(name.startswith(".dvc/cache/") for name in blobs)
    assert any(name.startswith("data/deid/") and name.endswith(".png") for name in blobs)
    needles = planted.needles() + [KEY]
    assert len(planted.uids) > 100 and "DOE^JOHN40_MRN123496" in planted.values
    leaks = find_leaks(blobs, needles)
    n_bytes = sum(len(b) for b in blobs.values())
    print(f"PHI search: {len(needles)} needles in {len(blobs)} files/streams, {n_bytes} bytes")
    assert not leaks, f"planted identifiers found in outputs: {leaks[:20]}"
    # the search itself finds what it looks for (the raw layout is full of them)
    raw = {p.name: p.read_bytes() for p in (repo / "data/raw").rglob("*") if p.is_file()}
    assert find_leaks(raw, ["MRN123456", "PRIVSECRET0000", "NESTEDMRN0000", f"{D.ROOT_UID}77310000"])
