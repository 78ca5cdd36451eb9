"""The deid stage's logic (triage/ingest.py) and prepare's use of its index: DICOM files of
the layout become pseudonymous PNGs + index rows; a layout without DICOM never needs a key."""
import hashlib
import os
import stat
from pathlib import Path

import dicomfactory as D
import imagefactory as F
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from triage.deid import KEY_ENV
from triage.dicom import read_dicom
from triage.errors import DataError, ParamsError, PipelineError
from triage.ingest import INDEX_SCHEMA, deidentify_layout, find_dicom, write_empty_index
from triage.prepare import build_manifest

KEY = "k" * 40
ENV = {KEY_ENV: KEY}
DEID = {"window": None, "multi_frame": "middle", "burned_in": "quarantine", "mask_border_px": 0,
        "dates": "shift", "reid_table": None}


def _layout(tmp_path):
    """4+4 PNG labelled images, and DICOM: 2 labelled cancer, 1 burned-in normal, 1 pool
    file without extension in a folder named after the patient, 1 test/ compressed."""
    planted = D.Planted()
    lay = F.make_layout(tmp_path / "raw")
    root = lay["root"]
    dcm = {
        "a": D.wrap(D.image(1, True), root / "labeled/cancer/DOE^JOHN00_ACC1.dcm", 0, 0, planted),
        "b": D.wrap(D.image(2, True), root / "labeled/cancer/second.DCM", 0, 1, planted),
        "burned": D.wrap(D.image(3, False), root / "labeled/normal/b.dcm", 1, 0, planted,
                         burned_in="YES"),
        "pool": D.wrap(D.image(4, False), root / "unlabeled/DOE^JOHN02_MRN123458/IMG", 2, 0, planted),
    }
    return lay, dcm, planted


def test_find_dicom_by_preamble_any_extension_hidden_skipped(tmp_path):
    lay, dcm, _ = _layout(tmp_path)
    D.copy_as(dcm["a"], lay["root"] / "labeled/cancer/.hidden.dcm")
    (lay["root"] / "labeled/cancer/fake.dcm").write_bytes(b"not a dicom")
    found = find_dicom(lay["root"])
    assert sorted((p.name, s, lbl) for p, s, lbl in found) == sorted([
        ("DOE^JOHN00_ACC1.dcm", "labeled", "cancer"), ("second.DCM", "labeled", "cancer"),
        ("b.dcm", "labeled", "normal"), ("IMG", "unlabeled", None)])


def test_a_layout_without_dicom_never_needs_a_key(tmp_path):
    lay = F.make_layout(tmp_path / "raw")
    index, stats = deidentify_layout(lay["root"], DEID, tmp_path / "deid", environ={})
    assert index.empty and stats["n_dicom"] == 0
    assert (tmp_path / "deid/index.parquet").is_file()
    df, info = build_manifest(lay["root"], "cancer", 0.25, 0, deid_index=tmp_path / "deid/index.parquet")
    assert len(df) == 12 and info["n_dicom"] == 0 and df["patient"].isna().all()
    assert write_empty_index(tmp_path / "demo").empty


def test_dicom_without_a_key_stops_before_reading_anything(tmp_path):
    lay, _, _ = _layout(tmp_path)
    with pytest.raises(PipelineError, match=KEY_ENV) as exc:
        deidentify_layout(lay["root"], DEID, tmp_path / "deid", environ={})
    assert "DOE" not in str(exc.value)
    assert not list((tmp_path / "deid").rglob("*.png"))


def test_pseudonymous_lossless_pngs_and_an_index_row_per_file(tmp_path):
    lay, dcm, planted = _layout(tmp_path)
    index, stats = deidentify_layout(lay["root"], DEID, tmp_path / "deid", environ=ENV)
    assert list(index.columns) == INDEX_SCHEMA.names
    assert stats["n_dicom"] == 4 and stats["n_deidentified"] == 3 and stats["reason/burned_in"] == 1
    assert stats["n_patients"] == 3
    written = sorted(p.relative_to(tmp_path / "deid").as_posix() for p in (tmp_path / "deid").rglob("*"))
    for rel in written:  # no original name or folder, no planted value anywhere in a name
        assert not any(n.lower() in rel.lower() for n in planted.needles()), rel
        assert "DOE" not in rel and "IMG" not in rel and "second" not in rel
    used = index[index["reason"].isna()]
    assert set(used["path"].str.rsplit("/", n=1).str[0]) == {
        f"{tmp_path}/deid/labeled/cancer", f"{tmp_path}/deid/unlabeled"}
    burned = index[index["reason"] == "burned_in"].iloc[0]
    assert burned["path"].endswith(".dcm") and not os.path.exists(burned["path"])
    assert burned["split"] == "labeled" and burned["label"] == "normal"
    # lossless: the PNG holds exactly read_dicom's pixels
    key = KEY.encode()
    img = read_dicom(dcm["a"], key)
    row = index[index["patient"] == img.patient].sort_values("path")
    pngs = [np.asarray(Image.open(p)) for p in row["path"]]
    assert any((a == img.pixels).all() for a in pngs)
    # deterministic: the same layout and key give the same bytes
    again, _ = deidentify_layout(lay["root"], DEID, tmp_path / "deid2", environ=ENV)
    assert [os.path.basename(p) for p in again["path"]] == [os.path.basename(p) for p in index["path"]]


def test_copies_of_one_file_get_distinct_pseudonymous_paths(tmp_path):
    lay, dcm, _ = _layout(tmp_path)
    D.copy_as(dcm["a"], lay["root"] / "labeled/cancer/copy_of_a.dcm")
    index, _ = deidentify_layout(lay["root"], DEID, tmp_path / "deid", environ=ENV)
    assert len(index) == 5 and index["path"].is_unique


def test_reid_table_outside_the_repo_is_private_inside_is_refused(tmp_path, monkeypatch):
    lay, _, _ = _layout(tmp_path)
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(repo)
    with pytest.raises(ParamsError, match="deid.reid_table"):
        deidentify_layout(lay["root"], {**DEID, "reid_table": "reid.csv"}, tmp_path / "deid", environ=ENV)
    table = tmp_path / "secure" / "reid.csv"
    index, _ = deidentify_layout(lay["root"], {**DEID, "reid_table": str(table)}, tmp_path / "deid",
                                 environ=ENV)
    assert stat.S_IMODE(table.stat().st_mode) == 0o600
    reid = pd.read_csv(table, dtype=str)
    assert list(reid.columns) == ["image_pseudonym", "path", "patient", "original_path",
                                  "original_patient_id"]
    assert sorted(reid["path"]) == sorted(index["path"])
    assert set(reid["original_patient_id"]) == {"MRN123456", "MRN123457", "MRN123458"}
    assert any("DOE^JOHN02_MRN123458/IMG" in p for p in reid["original_path"])
    # the pipeline's outputs never point to it
    assert str(table) not in (tmp_path / "deid/index.parquet").read_bytes().decode("latin-1")


def test_prepare_takes_dicom_rows_from_the_index(tmp_path):
    lay, dcm, _ = _layout(tmp_path)
    index, _ = deidentify_layout(lay["root"], DEID, tmp_path / "deid", environ=ENV)
    df, info = build_manifest(lay["root"], "cancer", 0.25, 0, deid_index=tmp_path / "deid/index.parquet")
    assert info["n_dicom"] == 4 and len(df) == 12 + 4
    assert not any(str(p) in set(df["path"]) for p in dcm.values())  # no raw DICOM path
    rows = df[df["path"].str.startswith(str(tmp_path / "deid"))]
    assert len(rows) == 4 and rows["patient"].notna().all()
    ok = rows[rows["read_error"].isna()]
    for r in ok.itertuples():
        assert r.id == hashlib.sha256(open(r.path, "rb").read()).hexdigest() and r.format == "PNG"
    bad = rows[rows["read_error"].notna()].iloc[0]
    assert bad["read_error"].startswith("burned_in: BurnedInAnnotation is YES") and pd.isna(bad["id"])
    assert df.loc[df["path"].isin(index["path"]) & df["split"].eq("unlabeled"), "label"].isna().all()
    # without the index (a library call), a DICOM is a dicom_not_supported row
    plain, _ = build_manifest(lay["root"], "cancer", 0.25, 0)
    assert plain["read_error"].fillna("").str.startswith("dicom_not_supported").sum() == 4


def test_an_index_made_from_other_data_is_refused(tmp_path):
    lay, dcm, _ = _layout(tmp_path)
    deidentify_layout(lay["root"], DEID, tmp_path / "deid", environ=ENV)
    D.copy_as(dcm["a"], lay["root"] / "test/cancer/new.dcm")
    F.write_png(lay["root"] / "test/normal/n.png", seed=99)
    with pytest.raises(DataError, match="run the deid stage again"):
        build_manifest(lay["root"], "cancer", 0.25, 0, deid_index=tmp_path / "deid/index.parquet")
    with pytest.raises(DataError, match="no .*missing.parquet: the deid stage"):
        build_manifest(lay["root"], "cancer", 0.25, 0, deid_index=tmp_path / "missing.parquet")


def test_a_loose_dicom_file_is_refused_without_its_name(tmp_path):
    lay, dcm, _ = _layout(tmp_path)
    D.copy_as(dcm["a"], lay["root"] / "labeled/DOE^JOHN00.dcm")
    with pytest.raises(DataError, match=r"no class folder: 1 DICOM file ") as exc:
        build_manifest(lay["root"], "cancer", 0.25, 0, deid_index=tmp_path / "i.parquet")
    assert "DOE" not in str(exc.value)


def _params_with(tmp_path, **deid):
    import yaml

    from triage.params import load_params

    raw = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "params.yaml"))
    raw["deid"].update(deid)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return lambda: load_params(path)


@pytest.mark.parametrize("window,match", [
    ([40, 400], None), (None, None), ([40.5, 1], None),
    ([40], r"'deid.window' must be null or \[center, width\]"),
    ("40,400", r"'deid.window' must be null or \[center, width\]"),
    ([40, 0], r"'deid.window\[1\]' \(the width\) must be >= 1"),
    (["a", 400], r"'deid.window\[0\]' must be"),
])
def test_deid_window_param(tmp_path, window, match):
    load = _params_with(tmp_path, window=window)
    if match is None:
        assert load()["deid"]["window"] == window
    else:
        with pytest.raises(ParamsError, match=match):
            load()


def test_burned_in_mask_needs_a_border(tmp_path):
    with pytest.raises(ParamsError, match="deid.burned_in.*deid.mask_border_px"):
        _params_with(tmp_path, burned_in="mask", mask_border_px=0)()
    assert _params_with(tmp_path, burned_in="mask", mask_border_px=4)()["deid"]["mask_border_px"] == 4
